"""Plans in flight, run in waves: every pending call of many requests grouped by expert. Pure.

A request's plan starts with the route's calls; each output may trigger dependent calls
(`router.plan.triggered_calls`), which join the plan's pending calls. Whoever runs plans - the
offline evaluator on a whole dataset, an expert host on the batch the router sent it, the router
across hosts - takes the pending calls it can run, grouped by expert so each expert runs one batch
per wave, records the outputs and repeats until nothing it can run is pending. Calls it cannot run
(their expert lives elsewhere) stay pending for the caller.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from expertmesh.experts.spec import CoESpec
from expertmesh.router.plan import Call, ExpertOutput, triggered_calls

K = TypeVar("K", bound=Hashable)


@dataclass
class PlanInFlight:
    """One request's plan while it runs: the calls not made yet, every expert planned so far (a dependent expert
    runs once per request however many outputs trigger it), and the calls made with their outputs, in order."""

    pending: list[Call]
    planned: set[str]
    done: list[tuple[Call, ExpertOutput]] = field(default_factory=list)

    @classmethod
    def start(cls, calls: Iterable[Call], planned: Iterable[str] = ()) -> PlanInFlight:
        calls = list(calls)
        return cls(calls, set(planned) | {c.expert for c in calls})

    @property
    def finished(self) -> bool:
        return not self.pending


def take_calls(plans: Mapping[K, PlanInFlight], runs_here: Callable[[str], bool] = lambda expert: True
               ) -> dict[str, list[tuple[K, Call]]]:
    """Remove from every plan the pending calls whose expert `runs_here`, grouped by expert (experts sorted, requests
    in the order of `plans`): one batch per expert for this wave. Other calls stay pending."""
    wave: dict[str, list[tuple[K, Call]]] = defaultdict(list)
    for key, plan in plans.items():
        keep = []
        for call in plan.pending:
            if runs_here(call.expert):
                wave[call.expert].append((key, call))
            else:
                keep.append(call)
        plan.pending = keep
    return dict(sorted(wave.items()))


def record(spec: CoESpec, plan: PlanInFlight, call: Call, output: ExpertOutput) -> list[Call]:
    """Record one call's output; the calls it triggers join the plan's pending calls. Returns them."""
    plan.done.append((call, output))
    new = triggered_calls(spec, output, plan.planned)
    plan.planned.update(c.expert for c in new)
    plan.pending.extend(new)
    return new


def merge(plan: PlanInFlight, done: Iterable[tuple[Call, ExpertOutput]], pending: Iterable[Call],
          planned: Iterable[str]) -> None:
    """Fold what another runner did with part of this plan back in: its outputs, the calls it left pending (those
    already made or pending here are dropped: two runners may trigger the same expert) and what it planned."""
    plan.done.extend(done)
    made = {c.expert for c, _ in plan.done} | {c.expert for c in plan.pending}
    for call in pending:
        if call.expert not in made:
            plan.pending.append(call)
            made.add(call.expert)
    plan.planned.update(planned)
