"""The placement heuristic for instances too large to solve exactly (pure): merge along the heaviest edges while a
group fits a node, first-fit decreasing onto nodes under the balance bound (an expert no device holds goes off
the device to the least loaded node that can load it), local search moving single experts, replicas of cut
downstream experts, then per node the homes its device holds, most miss cost per byte first."""

from __future__ import annotations

from dataclasses import dataclass

from expertmesh.cluster.placement_problem import (ExpertDemand, PlacementProblem, Solved, balance_bound, device_capacity,
                                                  merged_edges, miss_costs, node_bytes)


@dataclass
class _Nodes:
    """The heuristic's view of every node: what it holds (homes and replicas), what its device holds, its load."""

    p: PlacementProblem
    by_name: dict[str, ExpertDemand]
    cap: dict[str, int]
    held: dict[str, set[str]]
    resident: dict[str, set[str]]
    load: dict[str, float]

    @classmethod
    def empty(cls, p: PlacementProblem) -> _Nodes:
        names = [n.name for n in p.nodes]
        return cls(p, {e.name: e for e in p.experts}, {n.name: device_capacity(p, n) for n in p.nodes},
                   {n: set() for n in names}, {n: set() for n in names}, {n: 0.0 for n in names})

    def free(self, n: str) -> int:
        return self.cap[n] - node_bytes(self.by_name, self.held[n], self.resident[n])

    def fits(self, n: str, add: set[str], *, resident: bool = True) -> bool:
        """Whether node `n` still fits with `add` held there (on its device when `resident`)."""
        return node_bytes(self.by_name, self.held[n] | add, self.resident[n] | (add if resident else set())) \
            <= self.cap[n]

    def put(self, n: str, add: set[str], *, resident: bool = True, home: bool = True) -> None:
        self.held[n] |= add
        if resident:
            self.resident[n] |= add
        if home:
            self.load[n] += sum(self.by_name[e].load for e in add)

    def take(self, n: str, e: str) -> None:
        self.held[n].discard(e)
        self.resident[n].discard(e)
        self.load[n] -= self.by_name[e].load


def solve_heuristic(p: PlacementProblem) -> Solved | None:
    by_name = {e.name: e for e in p.experts}
    state = _Nodes.empty(p)
    bound = balance_bound(p)
    movable = sorted(e.name for e in p.experts if not e.everywhere)
    edges = sorted(((w, u, v) for (u, v), w in merged_edges(p).items() if u in movable and v in movable),
                   key=lambda t: (-t[0], t[1], t[2]))
    groups = _merge_along_heaviest_edges(by_name, movable, edges, max(state.cap.values()), bound)
    homes = _first_fit_decreasing(p, groups, state, bound)
    if homes is None:
        return None
    _improve(p, homes, movable, state, bound)
    replicas = {e: {homes[e]} for e in movable}
    if p.config.allow_replicas:
        _replicate_cut_downstreams(edges, homes, replicas, state)
    offloaded = _choose_resident(p, homes, replicas, state)
    for e in p.experts:
        if e.everywhere:
            homes[e.name] = p.nodes[0].name
            replicas[e.name] = {n.name for n in p.nodes}
    return homes, replicas, offloaded


def _merge_along_heaviest_edges(by_name: dict[str, ExpertDemand], movable: list[str],
                                edges: list[tuple[float, str, str]], cap_bytes: int, bound: float) -> list[set[str]]:
    """Step 1: merge groups along the heaviest edges while a group still fits `cap_bytes` (the largest node's device,
    every member resident) and the balance bound; the groups, largest memory first."""
    cluster = {e: {e} for e in movable}
    for _, u, v in edges:
        a, b = cluster[u], cluster[v]
        if a is b:
            continue
        merged = a | b
        if node_bytes(by_name, merged, merged) <= cap_bytes and sum(by_name[e].load for e in merged) <= bound:
            for e in merged:
                cluster[e] = merged
    return sorted({id(c): c for c in cluster.values()}.values(),
                  key=lambda g: (-node_bytes(by_name, g, g), sorted(g)))


def _first_fit_decreasing(p: PlacementProblem, groups: list[set[str]], state: _Nodes,
                          bound: float) -> dict[str, str] | None:
    """Step 2: each group onto the node with the most free device memory that holds it resident and keeps the balance
    bound (preferring the node the current placement has it on), splitting a group that fits nowhere; an expert that
    fits no device goes, off the device, to the least loaded node whose pool can load it. None: even that breaks the
    balance bound."""
    by_name = state.by_name
    order = {n.name: i for i, n in enumerate(p.nodes)}
    homes: dict[str, str] = {}
    for group in groups:
        pieces = [group]
        while pieces:
            piece = pieces.pop(0)
            ld = sum(by_name[e].load for e in piece)
            fits = [n for n in state.cap if state.fits(n, piece) and state.load[n] + ld <= bound]
            if fits:
                target = max(fits, key=lambda n: (sum(n in p.current.get(e, ()) for e in piece), state.free(n),
                                                  -order[n]))
                state.put(target, set(piece))
                homes.update({e: target for e in piece})
            elif len(piece) > 1:  # split the group: largest expert alone, the rest together
                big = max(sorted(piece), key=lambda e: by_name[e].memory_bytes + by_name[e].activation_bytes)
                pieces[:0] = [{big}, piece - {big}]
            else:
                (e,) = piece
                able = [n for n in state.cap if by_name[e].memory_bytes + by_name[e].activation_bytes <= state.cap[n]
                        and state.load[n] + ld <= bound]
                if not able:
                    return None
                target = min(able, key=lambda n: (state.load[n], -state.free(n), order[n]))
                state.put(target, {e}, resident=False)
                homes[e] = target
    return homes


def _choose_resident(p: PlacementProblem, homes: dict[str, str], replicas: dict[str, set[str]],
                     state: _Nodes) -> set[str]:
    """Step 4: per node, which homes its device holds, beside the extra replicas (always resident) and the reserve for
    the largest batch of what it holds: the most miss cost per byte first, while they fit. Returns the homes off the
    device."""
    by_name, miss = state.by_name, miss_costs(p)
    offloaded: set[str] = set()
    for n in state.cap:
        held = {e for e, ns in replicas.items() if n in ns}
        extra = {e for e in held if homes[e] != n}
        resident = set(extra)
        for e in sorted(held - extra, key=lambda e: (-miss[e] / max(by_name[e].memory_bytes, 1), e)):
            if node_bytes(by_name, held, resident | {e}) <= state.cap[n]:
                resident.add(e)
            else:
                offloaded.add(e)
        state.held[n], state.resident[n] = held, resident
    return offloaded


def _replicate_cut_downstreams(edges: list[tuple[float, str, str]], homes: dict[str, str],
                               replicas: dict[str, set[str]], state: _Nodes) -> None:
    """Step 3: a replica of each cut downstream expert on its upstream's node, heaviest cut first, while device memory
    allows (an extra replica off the device would only trade a hop for a switch)."""
    for _, u, v in edges:
        n = homes[u]
        if n not in replicas[v] and state.fits(n, {v}):
            replicas[v].add(n)
            state.put(n, {v}, home=False)


def _improve(p: PlacementProblem, homes: dict[str, str], movable: list[str], state: _Nodes, bound: float) -> None:
    """Local search: move one expert at a time to the node that cuts the least weight (held resident there), while
    any move helps."""
    by_name = state.by_name
    edges = [(u, v, w) for (u, v), w in merged_edges(p).items() if u in homes and v in homes
             and not by_name[u].everywhere and not by_name[v].everywhere]

    def cut_of(e: str, node: str) -> float:
        return sum(w for u, v, w in edges if e in (u, v) and homes[v if u == e else u] != node)

    improved = True
    while improved:
        improved = False
        for e in movable:
            here, ld = homes[e], by_name[e].load
            for node in sorted(state.cap):
                if node == here or not state.fits(node, {e}) or state.load[node] + ld > bound:
                    continue
                if cut_of(e, node) < cut_of(e, here) - 1e-12:
                    state.take(here, e)
                    state.put(node, {e})
                    homes[e], here, improved = node, node, True
