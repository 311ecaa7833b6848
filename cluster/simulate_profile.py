"""The simulator's experts from a measured profile (this machine's costs), to predict a real run. Pure.

Each profiled expert becomes a `SimExpert`: its footprint, the latency fit's K and B, its best batch, its usage
probability (the profile's usage weights) and its upstream experts (the usage profile's dependency edges between
profiled experts: the spec's dependencies, what the pooled host's eviction reads - not the router's table edges),
and its measured load times: host -> device, and disk -> host + host -> device (medians).
"""

from __future__ import annotations

from collections import defaultdict

from expertmesh.cluster.simulate_model import SimExpert
from expertmesh.errors import InvalidArgument
from expertmesh.profiler.store import ProfileStore


def experts_from_profile(store: ProfileStore, device: str) -> dict[str, SimExpert]:
    """Every expert `store` profiled on `device` (cpu | cuda), with its measured costs."""
    profiles = {p.expert: p for p in store.entries.values() if p.device == device}
    if not profiles:
        raise InvalidArgument(f"the profile has no entries for device {device!r}", field="device",
                              fix="run `expertmesh profile` on that device, or pick one the profile has")
    usage = store.usage.usage if store.usage else {}
    upstreams: dict[str, set[str]] = defaultdict(set)
    for edge in store.usage.edges if store.usage else ():  # the dependency graph, as the pooled host reads it
        if edge.kind == "dependency" and edge.upstream in profiles and edge.downstream in profiles:
            upstreams[edge.downstream].add(edge.upstream)
    out = {}
    for name, p in sorted(profiles.items()):
        p.require_valid()
        to_device = p.move_ms("host", "device")
        to_host = p.move_ms("disk", "host")
        out[name] = SimExpert(num_bytes=p.footprint_bytes, k_ms_per_item=p.fit.k_ms_per_item, b_ms=p.fit.b_ms,
                              max_batch=p.max_useful_batch, usage=usage.get(name, 0.0),
                              upstreams=frozenset(upstreams.get(name, ())), load_from_host_ms=to_device,
                              load_from_disk_ms=to_host + to_device if to_host is not None and to_device is not None
                              else None)
    return out
