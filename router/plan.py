"""A request's plan: which experts run, why, and the verdict their outputs add up to. Pure policy.

Step 1 (the router model) yields a category and a confidence. `initial_calls` turns that, the
request metadata and the spec into the first experts to call: gating rules first (they may force
a category or add experts), then the category-to-expert table; a confidence below the router's
threshold sends the request to the fallback expert instead (or to no expert: verdict UNCERTAIN).
`triggered_calls` gives the experts an output triggers along dependency edges; `aggregate`
turns all outputs into one verdict. The serving glue and the offline evaluator both drive these.
"""

from __future__ import annotations

import enum
from collections.abc import Collection
from dataclasses import dataclass, field

from expertmesh.experts.spec import CoESpec, GatingRuleSpec


class Reason(str, enum.Enum):
    """Why an expert was called: the category classifier itself (step 1: ROUTER, in traces only), the category
    table, a gating rule, a dependency trigger, or the fallback."""

    ROUTER = "router"
    TABLE = "table"
    RULE = "rule"
    DEPENDENCY = "dependency"
    FALLBACK = "fallback"


class Verdict(str, enum.Enum):
    PASS = "PASS"
    DEFECT = "DEFECT"
    UNCERTAIN = "UNCERTAIN"


@dataclass(frozen=True)
class Call:
    expert: str
    reason: Reason
    because_of: str | None = None  # the rule name, or the upstream expert


@dataclass(frozen=True)
class ExpertOutput:
    expert: str
    label: str
    score: float


@dataclass(frozen=True)
class Route:
    category: str
    confidence: float
    rules: tuple[str, ...]
    fallback: bool
    calls: tuple[Call, ...]


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    defect: str  # the deciding label ("" when PASS, or UNCERTAIN because nothing ran)
    decided_by: str | None = None


@dataclass
class RequestMeta:
    component_hint: str = ""
    station_id: str = ""
    factory_id: str = ""
    product: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def rule_matches(rule: GatingRuleSpec, meta: RequestMeta) -> bool:
    for key, allowed in rule.match.model_dump().items():
        if allowed and getattr(meta, key) not in allowed:
            return False
    return True


def route(spec: CoESpec, category: str, confidence: float, meta: RequestMeta | None = None) -> Route:
    """Rules, then the table (or the fallback) -> the first calls of the plan, in a deterministic order."""
    meta = meta or RequestMeta()
    hits = [r for r in spec.gating_rules if rule_matches(r, meta)]
    forced = next((r for r in hits if r.force_category is not None), None)
    calls: list[Call] = []
    fallback = False
    if forced is not None:
        category, confidence = forced.force_category, 1.0
        calls += [Call(name, Reason.RULE, forced.name) for name in spec.category(category).experts]
    elif confidence < spec.router.min_confidence:
        fallback = True
        if spec.router.fallback_expert:
            calls.append(Call(spec.router.fallback_expert, Reason.FALLBACK, None))
    else:
        calls += [Call(name, Reason.TABLE, None) for name in spec.category(category).experts]
    for r in hits:
        calls += [Call(name, Reason.RULE, r.name) for name in r.add_experts]
    seen: set[str] = set()
    unique = [c for c in calls if not (c.expert in seen or seen.add(c.expert))]
    return Route(category, confidence, tuple(r.name for r in hits), fallback, tuple(unique))


def triggered_calls(spec: CoESpec, output: ExpertOutput, planned: Collection[str]) -> list[Call]:
    """Experts that `output` triggers through dependency edges, skipping those in `planned` (and repeats), in the
    spec's order. Nothing is written: the caller adds the returned experts to its own bookkeeping."""
    out: list[Call] = []
    for d in spec.dependencies:
        if (d.upstream == output.expert and output.label in d.on_labels and d.downstream not in planned
                and all(c.expert != d.downstream for c in out)):
            out.append(Call(d.downstream, Reason.DEPENDENCY, output.expert))
    return out


def _triggers_something(spec: CoESpec, output: ExpertOutput) -> bool:
    return any(d.upstream == output.expert and output.label in d.on_labels for d in spec.dependencies)


def aggregate(spec: CoESpec, outputs: list[ExpertOutput]) -> Outcome:
    """One verdict from all outputs, in call order.

    An output that triggered a downstream expert defers to it; every other output is terminal.
    A terminal label that is neither a pass label nor an uncertain label of its expert is a defect (the first one
    decides); else a terminal uncertain label makes the verdict UNCERTAIN (a person should look; the first one is
    named); no terminal output at all (nothing ran) is UNCERTAIN; otherwise PASS.
    """
    terminal = [o for o in outputs if not _triggers_something(spec, o)]
    if not terminal:
        return Outcome(Verdict.UNCERTAIN, "", None)
    uncertain = None
    for o in terminal:
        e = spec.expert(o.expert)
        if o.label in e.uncertain_labels:
            uncertain = uncertain or o
        elif o.label not in e.pass_labels:
            return Outcome(Verdict.DEFECT, o.label, o.expert)
    if uncertain is not None:
        return Outcome(Verdict.UNCERTAIN, uncertain.label, uncertain.expert)
    return Outcome(Verdict.PASS, "", None)
