"""Calibrating a CoE from measured scores (the Composition-of-Experts recipe). Pure policy: no torch, no models.

`expertmesh zoo calibrate` (glue: `profiler/calibration_run.py`) runs every expert on held-out validation images
once and hands the outputs to these functions, which decide:

* **Candidates** (`candidate_experts`): an expert may serve a category when its labels can judge every part of
  that category - a `classify` expert with `pass_labels` (so its outputs add up to a verdict) whose training
  defects (`training.defects`, else the keys of `training.label_map`, else all) cover every defect the generator
  draws for the category's component, and whose `training.components`, when given, include it. The category's
  current table entry is always an option too, whatever its size.
* **Scores** (`score_options`): an option's score on a category is the verdict accuracy (PASS for a good part,
  DEFECT otherwise) on that category's validation images when the category's table entry is that option, with
  the dependency triggers and the verdict aggregation of `router.plan` exactly as serving runs them (the image is
  routed to its true category: router errors are the threshold's business, not the table's).
* **The table** (`choose_table`): per category, the options within `tie_tolerance` of the best score are tied;
  among them the cheapest wins, where costs within `cost_tolerance` (relative) of the cheapest count as equal and
  are decided by score, then by keeping the current entry, then by the spec's expert order.
* **The threshold** (`threshold_for_target`): the smallest router `min_confidence` whose accepted requests (top
  category score >= threshold) are routed to a wrong category at most `target` of the time.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.spec import CoESpec, ExpertSpec
from expertmesh.router.plan import ExpertOutput, Outcome, Verdict, aggregate, route, triggered_calls

CALIBRATION_SEED_OFFSET = 2_000_029  # validation images: neither the training seed nor the report's held-out seed


class CalibrationConfig(BaseModel):
    """What `zoo calibrate` aims for and how it breaks ties."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target_wrong_route: float = Field(0.01, ge=0, lt=1, description="largest share of accepted requests routed "
                                                                    "to a wrong category")
    tie_tolerance: float = Field(0.005, ge=0, lt=1, description="scores this close to the best (absolute) are tied")
    cost_tolerance: float = Field(0.1, ge=0, lt=10, description="costs this close to the cheapest (relative) are equal")
    target_defect_recall: float | None = Field(None, gt=0, le=1, description="choose each expert's operating point "
                                               "(pass_min_probability) for this recall of defects; none: keep them")


Option = tuple[str, ...]  # a table entry: the experts a category calls, in order


def option_name(option: Option) -> str:
    return "+".join(option)


# --------------------------------------------------------------------------- candidates
def judges(expert: ExpertSpec, component: str) -> bool:
    """Whether `expert`'s labels can judge every generated part of `component` (the module's candidate rule)."""
    t = expert.training
    if expert.task != "classify" or not expert.pass_labels or t is None or t.data is not None or t.target != "defect":
        return False
    if t.components is not None and component not in t.components:
        return False
    covered = t.defects or (list(t.label_map) if t.label_map else list(generator.DEFECTS))
    return all(d in covered for d in generator.defects_for(component))


def candidate_options(spec: CoESpec) -> dict[str, list[Option]]:
    """Per category: every single expert that `judges` it, then the current entry when it is not one of those."""
    out = {}
    for c in spec.categories:
        opts: list[Option] = [(e.name,) for e in spec.experts if c.name in generator.COMPONENTS and judges(e, c.name)]
        current = tuple(c.experts)
        if current not in opts:
            opts.append(current)
        out[c.name] = opts
    return out


# --------------------------------------------------------------------------- scores
def run_plan(spec: CoESpec, first: Sequence[str], outputs: Mapping[str, Sequence[ExpertOutput]], i: int
             ) -> list[ExpertOutput]:
    """Image `i`'s outputs when its plan starts with the experts `first`: each output's dependency triggers are
    followed (each expert once per request), reading the precomputed `outputs[expert][i]`."""
    planned, queue, done = set(first), list(first), []
    while queue:
        out = outputs[queue.pop(0)][i]
        done.append(out)
        for call in triggered_calls(spec, out, planned):
            planned.add(call.expert)
            queue.append(call.expert)
    return done


def verdict_correct(verdict: Verdict, is_defect: bool) -> bool:
    return verdict is not Verdict.UNCERTAIN and (verdict is Verdict.DEFECT) == is_defect


def score_options(spec: CoESpec, options: Mapping[str, Sequence[Option]], outputs: Mapping[str, Sequence[ExpertOutput]],
                  images: Mapping[str, Sequence[int]], is_defect: Sequence[bool]) -> dict[str, dict[str, float]]:
    """{category: {option name: verdict accuracy}} on each category's images (`images[category]`: indices)."""
    scores: dict[str, dict[str, float]] = {}
    for cat, opts in options.items():
        idx = list(images.get(cat, []))
        row = {}
        for opt in opts:
            ok = [verdict_correct(aggregate(spec, run_plan(spec, opt, outputs, i)).verdict, is_defect[i]) for i in idx]
            row[option_name(opt)] = sum(ok) / len(ok) if ok else math.nan
        scores[cat] = row
    return scores


def simulate_coe(spec: CoESpec, router: Sequence[tuple[str, float]], outputs: Mapping[str, Sequence[ExpertOutput]]
                 ) -> list[Outcome]:
    """Every image through `spec` as serving runs it without request metadata: the router's (category, score),
    the table or the fallback by `min_confidence`, the triggers, the aggregated verdict."""
    return [aggregate(spec, run_plan(spec, [c.expert for c in route(spec, cat, score).calls], outputs, i))
            for i, (cat, score) in enumerate(router)]


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Choice:
    option: Option
    score: float
    cost: float
    reason: str  # "best", "tie: cheaper", "tie: kept", ...


def option_cost(option: Option, costs: Mapping[str, float]) -> float:
    return sum(costs[e] for e in option)


def choose_option(row: Mapping[str, float], options: Sequence[Option], costs: Mapping[str, float],
                  current: Option, tie_tolerance: float = 0.005, cost_tolerance: float = 0.1) -> Choice:
    """The best option of one category; ties (within `tie_tolerance` of the best) go to the cheaper (module doc)."""
    scored = [(o, row[option_name(o)]) for o in options if not math.isnan(row.get(option_name(o), math.nan))]
    if not scored:  # no validation images: nothing measured, keep what the spec says
        return Choice(current, math.nan, option_cost(current, costs), "kept: not measured")
    best = max(s for _, s in scored)
    tied = [(o, s) for o, s in scored if s >= best - tie_tolerance - 1e-12]
    cheapest = min(option_cost(o, costs) for o, _ in tied)
    cheap = [(o, s) for o, s in tied if option_cost(o, costs) <= cheapest * (1 + cost_tolerance) + 1e-12]
    order = {o: k for k, o in enumerate(options)}
    option, score = max(cheap, key=lambda p: (p[1], p[0] == current, -order[p[0]]))
    if score < best - 1e-12:
        reason = f"tie: {best - score:.3f} below the best, cheaper"
    elif not any(s >= best - 1e-12 for o, s in cheap if o != option):
        reason = "best"
    else:
        reason = "tie: kept current" if option == current else "tie: first in the spec"
    return Choice(option, score, option_cost(option, costs), reason)


def choose_table(scores: Mapping[str, Mapping[str, float]], options: Mapping[str, Sequence[Option]],
                 costs: Mapping[str, float], current: Mapping[str, Option], config: CalibrationConfig | None = None
                 ) -> dict[str, Choice]:
    config = config or CalibrationConfig()
    return {cat: choose_option(scores[cat], opts, costs, tuple(current[cat]), config.tie_tolerance,
                               config.cost_tolerance) for cat, opts in options.items()}


# --------------------------------------------------------------------------- the threshold
@dataclass(frozen=True)
class ThresholdChoice:
    threshold: float
    wrong_route_rate: float  # among accepted requests (score >= threshold)
    fallback_rate: float  # share of requests below the threshold
    reachable: bool
    lowest_rate: float  # the lowest wrong-route rate any threshold reaches on these pairs


def threshold_for_target(pairs: Sequence[tuple[float, bool]], target: float) -> ThresholdChoice:
    """`pairs`: (the router's top category score, whether that category is right), one per validation image.

    Thresholds are the observed scores; the chosen one is the smallest whose accepted pairs (score >= it) are wrong
    at most `target` of the time. It is the lowest score the accepted pairs have, so an input less confident than
    every accepted validation image still goes to the fallback. Unreachable target (every threshold's accepted
    pairs are wrong more often): `reachable` False and the threshold of the lowest rate (the smallest such)."""
    if not pairs:
        raise ValueError("no (confidence, correct) pairs: calibrating the threshold needs validation images")
    ordered = sorted(pairs, key=lambda p: p[0])
    n = len(ordered)
    distinct: list[tuple[float, int]] = []  # (score, index of its first pair)
    for k, (s, _) in enumerate(ordered):
        if not distinct or s != distinct[-1][0]:
            distinct.append((s, k))
    wrong_from = [0] * (n + 1)  # wrong pairs among ordered[k:]
    for k in range(n - 1, -1, -1):
        wrong_from[k] = wrong_from[k + 1] + (not ordered[k][1])
    rates = [(s, wrong_from[k] / (n - k), k) for s, k in distinct]
    lowest = min(r for _, r, _ in rates)
    hit = next(((s, r, k) for s, r, k in rates if r <= target + 1e-12), None)
    reachable = hit is not None
    s, r, k = hit if reachable else next(x for x in rates if x[1] == lowest)
    return ThresholdChoice(threshold=float(s), wrong_route_rate=r, fallback_rate=k / n, reachable=reachable,
                           lowest_rate=lowest)


def rates_at(pairs: Sequence[tuple[float, bool]], threshold: float) -> tuple[float, float]:
    """(wrong-route rate among accepted pairs, fallback rate) of `threshold` (nan when nothing is accepted)."""
    accepted = [ok for s, ok in pairs if s >= threshold]
    wrong = (len(accepted) - sum(accepted)) / len(accepted) if accepted else math.nan
    return wrong, 1 - len(accepted) / len(pairs) if pairs else math.nan


# --------------------------------------------------------------------------- the new spec
def calibrated_spec_data(data: dict, table: Mapping[str, Option], threshold: ThresholdChoice) -> tuple[dict, list[str]]:
    """The spec's YAML mapping with the chosen table and threshold, `version` + 1 and `expected_fallback_probability`
    the measured fallback rate. Classify experts that nothing reaches any more (no category, rule, fallback or
    dependency from a reached expert) are dropped with their dependency edges (a spec may not hold unreached
    experts); returns the new mapping and the dropped names."""
    out = copy.deepcopy(data)
    out["version"] = int(out.get("version", 1)) + 1
    for c in out["categories"]:
        c["experts"] = list(table[c["name"]])
    out["router"]["min_confidence"] = float(threshold.threshold)  # exact: rounding up would turn an image away
    out["router"]["expected_fallback_probability"] = round(threshold.fallback_rate, 6)
    reached = {n for c in out["categories"] for n in c["experts"]}
    reached |= {n for r in out.get("gating_rules", []) for n in r.get("add_experts", [])}
    if out["router"].get("fallback_expert"):
        reached.add(out["router"]["fallback_expert"])
    deps = out.get("dependencies", [])
    grew = True
    while grew:
        new = {d["downstream"] for d in deps if d["upstream"] in reached} - reached
        reached |= new
        grew = bool(new)
    router = out["router"]["expert"]  # a spec may leave `task` out: route for the router, classify for the rest
    dropped = [e["name"] for e in out["experts"]
               if e.get("task", "route" if e["name"] == router else "classify") == "classify" and e["name"] not in reached]
    out["experts"] = [e for e in out["experts"] if e["name"] not in dropped]
    if deps:
        out["dependencies"] = [d for d in deps if d["upstream"] not in dropped and d["downstream"] not in dropped]
    return out, dropped


# --------------------------------------------------------------------------- printing
def format_matrix(scores: Mapping[str, Mapping[str, float]], chosen: Mapping[str, Choice],
                  current: Mapping[str, Option], costs: Mapping[str, float], cost_unit: str) -> str:
    """The score matrix (categories x options, '-' where not a candidate; * marks the choice), then the chosen
    table beside the current one."""
    columns: list[str] = []
    for row in scores.values():
        columns += [k for k in row if k not in columns]
    short = {c: c.removesuffix("_defect") for c in columns}
    w = max([8] + [len(short[c]) + 1 for c in columns])
    lines = [f"{'category':<24}" + "".join(f"{short[c]:>{w}}" for c in columns), "-" * (24 + w * len(columns))]
    for cat, row in scores.items():
        pick = option_name(chosen[cat].option)
        cells = []
        for c in columns:
            v = row.get(c)
            cells.append("-" if v is None else ("n/a" if math.isnan(v) else f"{v:.3f}" + ("*" if c == pick else " ")))
        lines.append(f"{cat:<24}" + "".join(f"{x:>{w}}" for x in cells))
    unit_fmt = (lambda v: f"{v:.2f} ms") if cost_unit == "ms" else (lambda v: f"{v:,.0f} params")
    lines += ["", f"{'category':<24}{'current':<26}{'chosen':<26}{'score':>8}  cost / why", "-" * 100]
    for cat, ch in chosen.items():
        cur = option_name(tuple(current[cat]))
        new = option_name(ch.option)
        mark = "" if new == cur else "  <- changed"
        score = "n/a" if math.isnan(ch.score) else f"{ch.score:.3f}"
        lines.append(f"{cat:<24}{cur:<26}{new:<26}{score:>8}  {unit_fmt(ch.cost)}, {ch.reason}{mark}")
    return "\n".join(lines)
