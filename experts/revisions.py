"""Spec revisions served side by side: each expert's version, and the serving key that tells versions apart.

A live change (`expertmesh rollout`) serves a new revision of the CoE spec - an expert added, removed or given a
new checkpoint, a new table or rules - next to the one the app was built with (the base). The expert hosts and the
router then hold several revisions at once, and must never mix up two versions of one expert.

An expert's *version* is a digest of what makes its runtime: the architecture, labels, input size, device and the
checkpoint's bytes (`checkpoint_header.checkpoint_digest`). Its *serving key* - the name hosts, pools, metrics and plans use - is
its plain name when it is the base's expert of that name, byte for byte (or the base's expert's key when it is one
of the base's experts under another name: another CoE sharing a checkpoint), and `name@version` otherwise. `keyed()`
rewrites a revision's spec in serving keys (experts, router, table, dependencies, rules), so the plan, pool and
eviction code, which work by name, serve every revision unchanged; `plain_name()` turns a key back into the name
a client sees, with the version beside it in the response's trace.

`RevisionSet` is the glue both the router and the hosts use: it loads each revision's spec once (checkpoints checked,
versions computed) and keys it against the base.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from expertmesh.experts.spec import CoESpec, ExpertSpec, load_spec, resolve_checkpoint
from expertmesh.experts.checkpoint_header import checkpoint_digest

KEY_SEPARATOR = "@"
VERSION_CHARS = 8


def expert_version(expert: ExpertSpec, checkpoint_dir: Path) -> str:
    """The digest of what makes `expert`'s runtime: same version, same answers."""
    identity = {"architecture": expert.architecture.model_dump(mode="json"), "labels": list(expert.labels),
                "input_size_px": expert.input_size_px, "device": expert.device,
                "checkpoint": checkpoint_digest(checkpoint_dir)}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:VERSION_CHARS]


def plain_name(key: str) -> str:
    """The expert's name in a serving key (`chip_defect@1a2b3c4d` -> `chip_defect`)."""
    return key.split(KEY_SEPARATOR, 1)[0]


def serving_keys(base_versions: dict[str, str], versions: dict[str, str]) -> dict[str, str]:
    """name -> serving key for a revision's experts (`versions`: name -> version), against the base's. An expert that
    is one of the base's under another name (same version: same checkpoint bytes, labels, architecture) takes that
    expert's key, so another CoE reusing a checkpoint shares its replicas and memory instead of loading it twice."""
    by_version = {v: n for n, v in base_versions.items()}
    keys: dict[str, str] = {}
    for name, v in versions.items():
        if base_versions.get(name) == v:
            keys[name] = name
    for name, v in versions.items():
        if name not in keys:
            shared = by_version.get(v)
            unclaimed = shared is not None and shared not in keys.values() and shared not in versions
            keys[name] = shared if unclaimed else f"{name}{KEY_SEPARATOR}{v}"
    return keys


def keyed(spec: CoESpec, keys: dict[str, str]) -> CoESpec:
    """`spec` with every expert name (definitions and references) replaced by its serving key."""
    if all(k == n for n, k in keys.items()):
        return spec
    k = keys.get
    out = spec.model_copy(update={
        "experts": [e.model_copy(update={"name": k(e.name, e.name)}) for e in spec.experts],
        "router": spec.router.model_copy(update={
            "expert": k(spec.router.expert, spec.router.expert),
            "fallback_expert": k(spec.router.fallback_expert, spec.router.fallback_expert)}),
        "categories": [c.model_copy(update={"experts": [k(x, x) for x in c.experts]}) for c in spec.categories],
        "dependencies": [d.model_copy(update={"upstream": k(d.upstream, d.upstream),
                                               "downstream": k(d.downstream, d.downstream)}) for d in spec.dependencies],
        "gating_rules": [r.model_copy(update={"add_experts": [k(x, x) for x in r.add_experts]})
                         for r in spec.gating_rules]})
    out._base_dir = spec._base_dir
    return out


def revision_label(spec: CoESpec) -> str:
    """What a response names as the CoE that answered: `<spec name>@<spec version>`."""
    return f"{spec.name}@{spec.version}"


@dataclass(frozen=True)
class Revision:
    path: str  # the spec file ("" for the base: the spec the app was built with)
    spec: CoESpec  # in serving keys
    label: str  # spec name @ spec version
    versions: dict[str, str]  # serving key -> version
    names: dict[str, str]  # serving key -> the expert's name in this revision (what a response shows)


class RevisionSet:
    """The base revision and every other revision loaded so far (by spec path), keyed against the base."""

    def __init__(self, base_path: str | None, zoo_root: str | Path) -> None:
        self.zoo_root = Path(zoo_root)
        base = load_spec(base_path)
        self._base_versions = self._versions(base)
        self.base = Revision("", base, revision_label(base), {e.name: self._base_versions[e.name] for e in base.experts},
                             {e.name: e.name for e in base.experts})
        self._loaded: dict[str, Revision] = {}

    def _versions(self, spec: CoESpec) -> dict[str, str]:
        return {e.name: expert_version(e, resolve_checkpoint(e, self.zoo_root)) for e in spec.experts}

    def get(self, path: str) -> Revision:
        """The revision in the spec at `path` ("": the base), loaded (checkpoints checked) the first time it is asked
        for. A SpecError names the problem when the file or its checkpoints are missing."""
        if not path:
            return self.base
        if path not in self._loaded:
            spec = load_spec(path, zoo_root=self.zoo_root)
            versions = self._versions(spec)
            keys = serving_keys(self._base_versions, versions)
            self._loaded[path] = Revision(path, keyed(spec, keys), revision_label(spec),
                                          {keys[n]: v for n, v in versions.items()}, {k: n for n, k in keys.items()})
        return self._loaded[path]
