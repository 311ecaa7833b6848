"""Admission at the ingress: per-factory quotas, a bounded ingress, and weighted fair queuing. Pure (no I/O, no
clock but the one passed in); the ingress awaits the tickets it hands out.

A request (one component) or a board (all its components at once) is, in order:
1. refused when its factory is over its rate (`deployments.quotas.RateLimits`) or would pass its `max_in_flight`;
2. admitted when the ingress has room (`max_in_flight_components`) and nobody waits;
3. otherwise queued when its factory is within its fair share of the ingress (capacity x its weight / the weights
   of the factories in flight or waiting), else refused. Every slot that frees goes to the waiting factory with the
   least in flight per unit of weight (FIFO within a factory): a factory that floods waits behind the ones that
   do not, and a quiet factory's request goes next.

Refusals are RESOURCE_EXHAUSTED (HTTP 429) naming the factory and the limit; they count nothing. The bound is
components because that is what costs: a board of 50 weighs 50 single requests. A waiter leaves the queue when
its deadline passes or its client goes (`abandon`).
"""

from __future__ import annotations

import itertools
from collections import defaultdict, deque
from dataclasses import dataclass

from expertmesh.deployments.quotas import FactoryQuota, RateLimits
from expertmesh.errors import ResourceExhausted


@dataclass(eq=False)
class Ticket:
    """A queued request; `admitted` turns true when a freed slot goes to it."""

    number: int
    factory: str
    num_components: int
    admitted: bool = False


class Admission:
    def __init__(self, max_in_flight_components: int) -> None:
        if max_in_flight_components < 1:
            raise ValueError(f"max_in_flight_components is {max_in_flight_components}; it must be at least 1")
        self.max_in_flight_components = max_in_flight_components
        self.in_flight = 0
        self.by_factory: dict[str, int] = defaultdict(int)
        self.waiting: dict[str, deque[Ticket]] = defaultdict(deque)
        self.weights: dict[str, float] = {}
        self.rates = RateLimits()
        self._numbers = itertools.count()

    # ------------------------------------------------------------------ decisions
    def arrive(self, factory: str, num_components: int, quota: FactoryQuota, now_s: float,
               what: str = "request") -> Ticket | None:
        """None: admitted now (counted in). A Ticket: queued; it is admitted by a later `release`/`abandon`.
        Raises RESOURCE_EXHAUSTED (nothing counted) when the factory's quota or the ingress refuses it."""
        mine = self.by_factory[factory] + self._waiting_components(factory)
        if quota.max_in_flight is not None and mine + num_components > quota.max_in_flight and mine > 0:
            raise ResourceExhausted(
                f"factory {factory!r} has {mine} components in flight or queued, the {what} brings {num_components} "
                f"and its max_in_flight quota is {quota.max_in_flight}", field="factory_id",
                fix="wait for answers before sending more, or ask the operator to raise the factory's max_in_flight")
        weights_before = dict(self.weights)
        self.weights[factory] = quota.weight
        free = self.max_in_flight_components - self.in_flight
        admit_now = not self._anyone_waiting() and (num_components <= free or self.in_flight == 0)
        if not admit_now:  # a board larger than the whole bound goes alone, when nothing is in flight
            share = self.fair_share(factory)
            if mine + num_components > max(share, num_components):
                self.weights = weights_before
                raise ResourceExhausted(
                    f"the ingress is at capacity ({self.in_flight} of {self.max_in_flight_components} components in "
                    f"flight) and factory {factory!r} already has its fair share ({mine} of {share:.0f})",
                    field="factory_id",
                    fix="retry with backoff; if it lasts, add nodes or raise max_in_flight_components with them")
        try:
            self.rates.check(factory, num_components, quota, now_s)  # last: a refusal above takes no rate
        except ResourceExhausted:
            self.weights = weights_before
            raise
        if admit_now:
            self._count_in(factory, num_components)
            return None
        ticket = Ticket(next(self._numbers), factory, num_components)
        self.waiting[factory].append(ticket)
        return ticket

    def release(self, factory: str, num_components: int) -> list[Ticket]:
        """Count components out; returns the tickets the freed room admits (already counted in)."""
        self.by_factory[factory] = max(0, self.by_factory[factory] - num_components)
        self.in_flight = max(0, self.in_flight - num_components)
        if not self.by_factory[factory]:
            del self.by_factory[factory]
        return self._dispatch()

    def abandon(self, ticket: Ticket) -> list[Ticket]:
        """A queued request whose deadline passed or whose client went: out of the queue (or, when a slot had gone
        to it meanwhile, out of the count). Returns what that admits."""
        if ticket.admitted:
            return self.release(ticket.factory, ticket.num_components)
        queue = self.waiting.get(ticket.factory)
        if queue and ticket in queue:
            queue.remove(ticket)
        return self._dispatch()

    def fair_share(self, factory: str) -> float:
        """The components `factory` may hold when the ingress is contended: capacity x its weight over the weights
        of the factories in flight or waiting (it included)."""
        active = {f for f, n in self.by_factory.items() if n} | {f for f, q in self.waiting.items() if q} | {factory}
        total = sum(self.weights.get(f, 1.0) for f in active)
        return self.max_in_flight_components * self.weights.get(factory, 1.0) / total

    # ------------------------------------------------------------------ internals
    def _dispatch(self) -> list[Ticket]:
        admitted: list[Ticket] = []
        while self._anyone_waiting():
            factory = min((f for f, q in self.waiting.items() if q),
                          key=lambda f: (self.by_factory.get(f, 0) / self.weights.get(f, 1.0), self.waiting[f][0].number))
            head = self.waiting[factory][0]
            if head.num_components > self.max_in_flight_components - self.in_flight and self.in_flight > 0:
                break
            self.waiting[factory].popleft()
            self._count_in(factory, head.num_components)
            head.admitted = True
            admitted.append(head)
        for f in [f for f, q in self.waiting.items() if not q]:
            del self.waiting[f]
        return admitted

    def _count_in(self, factory: str, num_components: int) -> None:
        self.in_flight += num_components
        self.by_factory[factory] += num_components

    def _anyone_waiting(self) -> bool:
        return any(self.waiting.values())

    def _waiting_components(self, factory: str) -> int:
        return sum(t.num_components for t in self.waiting.get(factory, ()))
