"""Where a request's plan runs on a multi-node cluster (pure).

With a placement, every expert has a home node (and maybe replicas elsewhere). The router classifies
wherever it runs, then hands the plan to the executor on the node that holds the plan's first calls,
so those calls and the dependent calls they trigger find local replicas (the placement put
dependents beside their upstreams). Ties go to the lexicographically first node: deterministic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Collection, Iterable

from expertmesh.router.plan import Call


def execution_node(calls: Iterable[Call], homes: dict[str, str], alive: Collection[str] | None = None) -> str | None:
    """The node holding most of the plan's first calls (None when no call's expert has a home). A node known to be
    down (`alive` given and without it) is never chosen: its executor is gone until the placement is re-applied."""
    votes = Counter(homes[c.expert] for c in calls if c.expert in homes and (alive is None or homes[c.expert] in alive))
    if not votes:
        return None
    best = max(votes.values())
    return min(node for node, n in votes.items() if n == best)


def plan_runner(calls: Iterable[Call], homes: dict[str, str], alive: Collection[str] | None,
                executor_nodes: Collection[str]) -> str | None:
    """Which node's plan executor runs this plan, or None: the front router runs it itself.

    The front runs it when there is no placement (no homes, or no executors), when none of the plan's first calls
    has a home, when every node holding them is known to be lost (`alive` without it), or when the chosen node has
    no executor (a re-plan removed it, or it is not deployed yet)."""
    if not homes or not executor_nodes:
        return None
    node = execution_node(calls, homes, alive)
    return node if node in executor_nodes else None
