"""Which generated images train and evaluate each expert of a pcb-aoi spec, and the image pools.

An expert sees the components routed to it (by the category table, by its upstream experts, or
all of them for the router and the fallback) and the defects its training spec names; its label
for an image is the component (router) or the defect passed through `training.label_map`.
A `Pool` holds images per (component, defect); experts sharing a pair share its images.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from expertmesh.errors import SpecError, SpecProblem
from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.spec import CoESpec, ExpertSpec

EVAL_SEED_OFFSET = 1_000_003  # held-out images come from a different seed than training images


@dataclass(frozen=True)
class Sample:
    component: str
    defect: str
    label: str


def _routed_components(spec: CoESpec, name: str, seen: frozenset[str] = frozenset()) -> set[str]:
    if name in (spec.router.expert, spec.router.fallback_expert) or any(name in r.add_experts for r in spec.gating_rules):
        return set(generator.COMPONENTS)
    comps = {c.name for c in spec.categories if name in c.experts}
    for d in spec.dependencies:
        if d.downstream == name and d.upstream not in seen:
            comps |= _routed_components(spec, d.upstream, seen | {name})
    return comps


def expert_samples(spec: CoESpec, expert: ExpertSpec) -> list[Sample]:
    """The (component, defect, label) kinds that train `expert`, in a fixed order."""
    t = expert.training
    if t is None:
        raise SpecError([SpecProblem(f"experts.{expert.name}.training", "no training section",
                                     "add training: {target: ..., ...} to build this expert from generated data")])
    comps = t.components or sorted(_routed_components(spec, expert.name), key=generator.COMPONENTS.index)
    problems = [SpecProblem(f"experts.{expert.name}.training.components", f"{c!r} is not a generator component",
                            f"use one of {list(generator.COMPONENTS)}") for c in comps if c not in generator.COMPONENTS]
    allowed = t.defects or (list(t.label_map) if t.label_map else None)
    problems += [SpecProblem(f"experts.{expert.name}.training.defects", f"{d!r} is not a generator defect",
                             f"use one of {list(generator.DEFECTS)}") for d in (allowed or []) if d not in generator.DEFECTS]
    if problems:
        raise SpecError(problems)
    out = []
    for c in comps:
        for d in generator.defects_for(c):
            if allowed is None or d in allowed:
                out.append(Sample(c, d, c if t.target == "component" else t.label_map.get(d, d)))
    unseen = sorted(set(expert.labels) - {s.label for s in out})
    if unseen:
        raise SpecError([SpecProblem(f"experts.{expert.name}.labels", f"labels {unseen} get no training images",
                                     "map some defect to them in training.label_map, or drop them")])
    return out


def per_pair_counts(spec: CoESpec, expert: ExpertSpec) -> dict[tuple[str, str], int]:
    """Images needed per (component, defect) so each label gets about num_train_per_label images."""
    samples = expert_samples(spec, expert)
    pairs_per_label: dict[str, int] = {}
    for s in samples:
        pairs_per_label[s.label] = pairs_per_label.get(s.label, 0) + 1
    n = expert.training.num_train_per_label
    return {(s.component, s.defect): math.ceil(n / pairs_per_label[s.label]) for s in samples}


def _render_chunk(args: tuple[str, str, int, int, int]) -> np.ndarray:
    comp, defect, seed, start, stop = args
    return np.stack([np.asarray(generator.generate(comp, defect, seed, i)) for i in range(start, stop)])


def _worker_context() -> multiprocessing.context.BaseContext:
    """Render workers start from a fork server, not by forking the caller: a caller that holds gRPC or
    Ray threads (a test process, a serving driver) can leave a forked child dead on a lock it never owns."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


@dataclass
class Pool:
    """Generated images per (component, defect) for one seed: images[pair] is uint8 [n, H, W, 3]."""

    seed: int
    images: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    @classmethod
    def generate(cls, counts: dict[tuple[str, str], int], seed: int, *, desc: str = "generating images",
                 workers: int | None = None, progress: bool = True) -> Pool:
        """Render `counts[pair]` images per pair (indices 0..n-1) in parallel, with a progress bar."""
        chunk = 64
        jobs = [(c, d, seed, s, min(s + chunk, n)) for (c, d), n in counts.items() for s in range(0, n, chunk)]
        parts: dict[tuple[str, str], list[np.ndarray]] = {pair: [] for pair in counts}
        workers = workers or min(os.cpu_count() or 1, 8)
        with tqdm(total=sum(counts.values()), desc=desc, unit="img", disable=not progress) as bar:
            if workers > 1 and len(jobs) > 1:
                with ProcessPoolExecutor(max_workers=workers, mp_context=_worker_context()) as ex:
                    for job, arr in zip(jobs, ex.map(_render_chunk, jobs)):
                        parts[(job[0], job[1])].append(arr)
                        bar.update(len(arr))
            else:
                for job in jobs:
                    arr = _render_chunk(job)
                    parts[(job[0], job[1])].append(arr)
                    bar.update(len(arr))
        return cls(seed, {pair: np.concatenate(p) for pair, p in parts.items() if p})

    def arrays_for(self, samples: list[Sample], labels: list[str],
                   counts: dict[tuple[str, str], int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Images and integer labels for `samples` (first counts[pair] images of each pair, else all)."""
        xs, ys = [], []
        for s in samples:
            imgs = self.images[(s.component, s.defect)]
            if counts is not None:
                imgs = imgs[: counts[(s.component, s.defect)]]
            xs.append(imgs)
            ys.append(np.full(len(imgs), labels.index(s.label), dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)


def train_counts(spec: CoESpec) -> dict[tuple[str, str], int]:
    """The training pool: per pair, the most images any expert needs."""
    need: dict[tuple[str, str], int] = {}
    for e in spec.experts:
        if e.training is not None and e.training.data is None:  # file-data experts need no generated images
            for pair, n in per_pair_counts(spec, e).items():
                need[pair] = max(need.get(pair, 0), n)
    return need


def eval_counts(spec: CoESpec) -> dict[tuple[str, str], int]:
    return {pair: spec.num_eval_per_pair for pair in generator.all_pairs()}
