"""Which expert host runs a call (pure).

With a placement every expert has a home node, and each planned node runs one pooled expert host
(the `Host-<node>` deployment) holding the experts placed there; without one, a single `Host`
deployment (key "") holds them all. A call goes to its expert's home host; when that node is known
to be lost (`alive` given and without it, or the router saw its host die) or has no host (not
deployed yet, or a re-plan removed it), it goes to a surviving host, which loads the expert on
demand - a load of milliseconds, not a new process - until the re-plan moves the expert for good.
The surviving host is picked by a stable hash of the expert, so one expert's calls land on one host.
A hot expert the plan dedicated (`cluster.dedicate`) has its own deployment on its node: its calls go
there first, and to a pool (which loads it) only when no node with its own deployment is alive.
"""

from __future__ import annotations

import zlib
from collections.abc import Collection


def host_for(expert: str, homes: dict[str, str], hosts: Collection[str], alive: Collection[str] | None = None,
             lost: Collection[str] = (), dedicated: dict[str, dict[str, str]] | None = None,
             near: str | None = None, held_on: Collection[str] = (), home: str | None = None) -> str | None:
    """The host key that runs `expert`'s calls: its own deployment (`dedicated`: expert -> node -> key) on `near`
    (the node where the call's upstream ran), its home node, else another live node; else a pool (`hosts`: a node, or
    "" for the single unpinned host): `near`'s when the plan holds the expert there too (`held_on`), else its home's.
    None when no host is usable (every planned node is lost: the caller fails the call as UNAVAILABLE). `home`: the
    node to use when `homes` has none for `expert` (another version of a planned expert goes to the expert's home)."""
    own = (dedicated or {}).get(expert) or {}
    for node in sorted(own, key=lambda n: (n != near, n != homes.get(expert), n)):
        if own[node] not in lost and (alive is None or node in alive):
            return own[node]

    def usable(node: str) -> bool:
        return node in hosts and node not in lost and (alive is None or node == "" or node in alive)
    if near is not None and near in held_on and usable(near):
        return near  # a dependent call stays on its upstream's node when the plan put a replica there
    home = homes.get(expert, home or "")
    if usable(home):
        return home
    candidates = sorted(n for n in hosts if usable(n))
    if not candidates:
        return None
    return candidates[zlib.crc32(expert.encode()) % len(candidates)]
