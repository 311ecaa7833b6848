"""The CoEs an app serves, as planning input: every spec in serving keys, its request share, every expert's cost.

Glue between the files (specs, checkpoints, the profile store) and the pure demand (`cluster.demand`). The app's
spec (`--spec`) is the base; each other CoE (`--coe`) is keyed against it the way the router and the hosts key it
(`experts.revisions.RevisionSet`), so the plan names exactly the keys they serve, and an expert two CoEs share is one
key. Costs come from the profile store's current entries for the device each expert is served on, by the expert's
name in its own spec (a stale or missing entry - another CoE's expert nobody profiled - is estimated from its
checkpoint: `cluster.demand.estimated_costs`). Usage: the store's for the base spec (what `expertmesh profile`
measured), each other CoE's expected mix from its spec.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from expertmesh.cluster import demand
from expertmesh.cluster.demand import ServedCoE, estimated_costs, expert_cost, joint_usage
from expertmesh.cluster.costs import ExpertCost
from expertmesh.errors import InvalidArgument
from expertmesh.experts.checkpoint_header import WEIGHTS_FILE, checkpoint_bytes
from expertmesh.experts.revisions import RevisionSet
from expertmesh.experts.spec import CoESpec, load_spec, resolve_checkpoint
from expertmesh.profiler.serving_profiles import serving_devices, usable_profiles
from expertmesh.profiler.store import ExpertProfile, ProfileStore, UsageProfile
from expertmesh.profiler.usage import from_spec


@dataclass(frozen=True)
class ServedDemand:
    """Every served CoE (the base first), every key's cost, and which keys a current profile entry measured."""

    coes: list[ServedCoE]
    costs: dict[str, ExpertCost]
    profiled: frozenset[str] = field(default_factory=frozenset)

    @property
    def usage(self) -> UsageProfile:
        return joint_usage(self.coes)

    @property
    def keys(self) -> list[str]:
        return list(dict.fromkeys(e.name for c in self.coes for e in c.spec.experts))

    @property
    def fully_profiled(self) -> bool:
        """Whether every key was measured (else the estimates decide, and sizing is left to the settings)."""
        return set(self.keys) <= self.profiled


def check_shares(shares: dict[str, float], served: list[str], field_name: str = "coe_request_shares") -> None:
    """Refuse a share for a CoE not served, or one that is not positive, naming it."""
    unknown = sorted(set(shares) - set(served))
    if unknown:
        raise InvalidArgument(f"request shares name CoEs not served here: {', '.join(unknown)}", field=field_name,
                              fix=f"name one of: {', '.join(served)}")
    bad = {n: s for n, s in shares.items() if not s > 0}
    if bad:
        raise InvalidArgument(f"request shares must be positive, got {bad}", field=field_name,
                              fix="give each CoE a share > 0 (relative: 2 and 1 is two thirds and one third)")


def _costs(spec: CoESpec, keys: dict[str, str], zoo_root: Path, profiles: dict[str, ExpertProfile],
           costs: dict[str, ExpertCost], unprofiled: dict[str, tuple[int, int]]) -> None:
    """Add the spec's experts (name -> key in `keys`) to `costs` (profiled) or `unprofiled` (key -> weight bytes,
    batch size); a key already costed keeps its cost."""
    for e in spec.experts:
        key = keys.get(e.name, e.name)
        if key in costs:
            continue
        if e.name in profiles:
            costs[key] = expert_cost(profiles[e.name]).model_copy(update={"name": key})
            unprofiled.pop(key, None)
        elif key not in unprofiled:
            unprofiled[key] = (checkpoint_bytes(resolve_checkpoint(e, zoo_root) / WEIGHTS_FILE), e.max_batch)


def served_demand(spec_path: str | None, zoo_root: Path, coe_paths: list[str], store: ProfileStore | None,
                  expert_num_gpus: float = 0.0, shares: dict[str, float] | None = None,
                  usage: UsageProfile | None = None, warn: Callable[[str], None] | None = None,
                  shares_field: str = "coe_request_shares", require_profiles: bool = False) -> ServedDemand:
    """The planning input of the app serving `spec_path` (None: the embedded default) and `coe_paths` from
    `zoo_root`. `store`: the profile store (None: every cost estimated from the checkpoints); `shares`: CoE name ->
    relative request share (default 1 each); `usage`: the base spec's usage (default the store's, else the spec's
    expected mix). `require_profiles`: the base spec's experts must all have a current entry (FailedPrecondition
    naming them), as `expertmesh plan` needs; the other CoEs' may be estimated."""
    revisions = RevisionSet(spec_path, zoo_root)
    base = revisions.base.spec
    named: list[tuple[CoESpec, CoESpec, dict[str, str]]] = [(base, base, {e.name: e.name for e in base.experts})]
    for path in coe_paths:
        rev = revisions.get(path)
        named.append((load_spec(path), rev.spec, {name: key for key, name in rev.names.items()}))
    shares = dict(shares or {})
    check_shares(shares, [s.name for s, _, _ in named], shares_field)
    costs: dict[str, ExpertCost] = {}
    unprofiled: dict[str, tuple[int, int]] = {}
    coes = []
    for i, (spec, keyed, keys) in enumerate(named):
        # another CoE's expert without a current entry is estimated (documented), not warned about
        profiles = (usable_profiles(store, spec, zoo_root, serving_devices(spec, expert_num_gpus),
                                    warn=warn if i == 0 else None) if store else {})
        if i == 0 and require_profiles:
            demand.require_profiles(spec, profiles)
        _costs(spec, keys, zoo_root, profiles, costs, unprofiled)
        own_usage = (usage or (store.usage if store else None) or from_spec(keyed)) if i == 0 else from_spec(keyed)
        coes.append(ServedCoE(keyed, shares.get(spec.name, 1.0), own_usage))
    profiled = frozenset(costs)
    costs |= estimated_costs({k: w for k, (w, _) in unprofiled.items()}, {k: b for k, (_, b) in unprofiled.items()},
                             {k: costs[k] for k in profiled})
    return ServedDemand(coes, costs, profiled)
