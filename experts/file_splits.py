"""A file-data CoE's images as `zoo build` splits them, for everything that measures on them: every file-data model's
split (`read_splits`) and the category of an image (`categorizer`). `experts/file_eval.py` (the report, calibration)
and `experts/file_baseline.py` (the monolith) both read them here.
"""

from __future__ import annotations

from expertmesh.experts import labeled_data
from expertmesh.experts.spec import CoESpec
from expertmesh.experts.training import resolve_plan


def _trains_on_files(expert) -> bool:
    return expert.training is not None and expert.training.data is not None


def read_splits(spec: CoESpec, *, progress: bool = True) -> dict[str, labeled_data.SplitData]:
    """Every file-data model's data as `zoo build` splits it; one DataError listing every problem."""
    out, problems = {}, []
    for e in spec.experts:
        if not _trains_on_files(e):
            continue
        plan = resolve_plan(e.training)
        data, found = labeled_data.split_data(spec, e, progress=progress, validation_fraction=plan.validation_fraction,
                                              test_fraction=plan.test_fraction)
        problems += [labeled_data.DataProblem(p.file, f"[{e.name}] {p.message}", p.fix) for p in found]
        out[e.name] = data
    if problems:
        raise labeled_data.DataError(problems)
    return out


def has_split(splits: dict[str, labeled_data.SplitData], split: str) -> bool:
    return any(s == split for d in splits.values() for s in d.splits)


def categorizer(spec: CoESpec, splits: dict[str, labeled_data.SplitData]):
    """f(record, content hash, expert name) -> the image's category or None: its manifest row's `category`, else
    the router's label for the same content, else the one category whose table sends to that expert."""
    router = splits.get(spec.router.expert)
    category_of = {h: r.label for r, h in zip(router.records, router.hashes)} if router is not None else {}
    served: dict[str, list[str]] = {}
    for c in spec.categories:
        for name in c.experts:
            served.setdefault(name, []).append(c.name)

    def category(record: labeled_data.Record, h: str | None, expert: str) -> str | None:
        sole = served[expert][0] if len(served.get(expert, [])) == 1 else None
        return record.category or category_of.get(h) or sole

    return category
