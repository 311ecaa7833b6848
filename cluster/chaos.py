"""Faults under station load: the schedule of a chaos run and the tally of what every request ended in.

Pure: no Ray, no processes, no clock of its own. The scenario (tests/test_chaos.py: a real 3-node local cluster,
stations sending gRPC requests with a deadline, replica processes killed with SIGKILL and a worker node removed)
records one `RequestOutcome` per request sent and one `Fault` per fault injected, on one clock (seconds since the
load started); `chaos_report` turns them into counts per outcome (overall and per phase: a request belongs to the
phase of the last fault injected before it was sent), the seconds each fault took to recover from, and the
violations of the rules a run must keep (`violations`): every request sent has an outcome, none hung past its
deadline plus a grace, every failure is an explicit retryable status (never INTERNAL), requests succeed after the
last fault, and a lost node's experts answer again within the bound.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

FAULT_KINDS = ("expert_host", "router", "ingress", "node")  # in the order a run injects them
RETRYABLE = frozenset({"UNAVAILABLE", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED"})
HUNG = "HUNG"  # no status within the client's deadline + the grace: the request hung
OK = "OK"
BEFORE = "before"  # the phase before the first fault
NODE_LOSS_BOUND_S = 80.0  # the fast-path issue's measurement before it: a lost node's experts back within 80 s


@dataclass(frozen=True)
class Fault:
    kind: str  # one of FAULT_KINDS
    target: str  # what was killed: a replica actor's name and pid, or a node's name
    at_s: float  # when (seconds since the load started)
    experts: frozenset[str] = frozenset()  # experts whose answer shows recovery (empty: any answer does)


@dataclass(frozen=True)
class RequestOutcome:
    code: str  # gRPC status code name, OK, or HUNG
    sent_s: float  # seconds since the load started
    seconds: float  # until its status (for HUNG: until the client gave up waiting)
    station: str = ""
    board: bool = False
    experts: frozenset[str] = frozenset()  # experts that answered it (OK only)
    details: str = ""

    @property
    def done_s(self) -> float:
        return self.sent_s + self.seconds


def ingress_died_internal(o: RequestOutcome, faults: list[Fault]) -> bool:
    """A request in flight inside the ingress replica when its process died, ended INTERNAL with Ray's actor-death
    text: Serve's gRPC proxy maps any RayActorError from the replica to INTERNAL (ray/serve/_private/grpc_util.py
    `get_grpc_response_status`, Ray 2.60). deployments/grpc_service.py now answers it UNAVAILABLE; counted apart
    (`known_internal`) so a run that sees it again names the cause. Still a violation."""
    return (o.code == "INTERNAL" and "actor died" in o.details and ":Ingress" in o.details
            and any(f.kind == "ingress" and o.sent_s < f.at_s <= o.done_s for f in faults))


@dataclass
class ChaosReport:
    num_sent: int
    counts: dict[str, int]
    counts_by_phase: dict[str, dict[str, int]]
    # per fault: kind, target, at_s, recovery_s, how the requests in flight when it struck ended, and the failures
    # that ended between it and the next fault
    faults: list[dict] = field(default_factory=list)
    slowest_s: float = 0.0
    node_loss_bound_s: float = NODE_LOSS_BOUND_S
    known_internal: int = 0  # INTERNAL from Serve's proxy for requests in flight in the killed ingress (see above)

    def to_dict(self) -> dict:
        return asdict(self)


def fault_at(kind: str, target: str, at_s: float, experts=()) -> Fault:
    if kind not in FAULT_KINDS:
        raise ValueError(f"fault kind {kind!r} is not one of {', '.join(FAULT_KINDS)}")
    return Fault(kind, target, at_s, frozenset(experts))


def next_fault_due(last_at_s: float, recovered_s: float | None, now_s: float, *, min_pause_s: float,
                   max_pause_s: float, settle_s: float) -> bool:
    """Whether the next fault is due: at least `min_pause_s` after the last one, and `settle_s` after requests
    recovered from it (so the phases do not blur), but never later than `max_pause_s` after it."""
    if now_s - last_at_s >= max_pause_s:
        return True
    if now_s - last_at_s < min_pause_s:
        return False
    return recovered_s is not None and now_s >= last_at_s + recovered_s + settle_s


def phase_of(sent_s: float, faults: list[Fault]) -> str:
    """The kind of the last fault injected at or before `sent_s` (BEFORE when none was)."""
    phase = BEFORE
    for f in sorted(faults, key=lambda f: f.at_s):
        if f.at_s <= sent_s:
            phase = f.kind
    return phase


def recovery_s(outcomes: list[RequestOutcome], fault: Fault) -> float | None:
    """Seconds from the fault to the first answer (OK) of a request sent after it that needed one of the fault's
    experts (any answer when it names none); None when no such request was answered."""
    done = [o.done_s for o in outcomes if o.code == OK and o.sent_s >= fault.at_s
            and (not fault.experts or o.experts & fault.experts)]
    return round(min(done) - fault.at_s, 2) if done else None


def chaos_report(num_sent: int, outcomes: list[RequestOutcome], faults: list[Fault]) -> ChaosReport:
    counts = Counter(o.code for o in outcomes)
    phases = [BEFORE, *(f.kind for f in sorted(faults, key=lambda f: f.at_s))]
    by_phase: dict[str, Counter] = {p: Counter() for p in phases}
    for o in outcomes:
        by_phase[phase_of(o.sent_s, faults)][o.code] += 1
    rows = []
    ordered = sorted(faults, key=lambda f: f.at_s)
    for f, nxt in zip(ordered, [*ordered[1:], None]):
        # the failures that ended between this fault and the next: what this fault cost
        end_s = nxt.at_s if nxt is not None else float("inf")
        failed = [o for o in outcomes if o.code != OK and f.at_s <= o.done_s < end_s]
        caught = [o for o in outcomes if o.sent_s < f.at_s <= o.done_s]  # in flight when the fault struck
        rows.append({"kind": f.kind, "target": f.target, "at_s": round(f.at_s, 2),
                     "recovery_s": recovery_s(outcomes, f),
                     "in_flight": dict(sorted(Counter(o.code for o in caught).items())),
                     "recovery_experts": sorted(f.experts),
                     "failures_after": dict(Counter(o.code for o in failed)),
                     "last_failure_s": round(max(o.done_s for o in failed) - f.at_s, 2) if failed else None})
    return ChaosReport(num_sent=num_sent, counts=dict(sorted(counts.items())),
                       counts_by_phase={p: dict(sorted(c.items())) for p, c in by_phase.items()}, faults=rows,
                       slowest_s=round(max((o.seconds for o in outcomes), default=0.0), 2),
                       known_internal=sum(ingress_died_internal(o, faults) for o in outcomes))


def violations(report: ChaosReport, outcomes: list[RequestOutcome], faults: list[Fault]) -> list[str]:
    """What a run must not do, each as a sentence; empty when the run kept every rule."""
    out = []
    if len(outcomes) != report.num_sent:
        out.append(f"{report.num_sent - len(outcomes)} of {report.num_sent} requests vanished (no outcome)")
    if report.counts.get(HUNG):
        out.append(f"{report.counts[HUNG]} requests hung past their deadline and the grace")
    unexplained = [o for o in outcomes if o.code not in RETRYABLE | {OK, HUNG}]
    wrong = dict(Counter(o.code for o in unexplained))
    if wrong:
        examples = [o.details[:200] for o in unexplained][:3]
        known = sum(ingress_died_internal(o, faults) for o in unexplained)
        out.append(f"failures that are not an explicit retryable status: {wrong}; e.g. {examples}"
                   + (f" ({known} of them Serve's proxy's INTERNAL for a request inside the killed ingress)"
                      if known else ""))
    if faults:
        last = max(f.at_s for f in faults)
        if not any(o.code == OK and o.sent_s >= last for o in outcomes):
            out.append("no request sent after the last fault was answered")
    for row in report.faults:
        if row["recovery_s"] is None:
            out.append(f"no answer after the {row['kind']} fault ({row['target']})")
        elif row["kind"] == "node" and row["recovery_s"] > report.node_loss_bound_s:
            out.append(f"the lost node's experts answered again after {row['recovery_s']} s, over the "
                       f"{report.node_loss_bound_s:g} s bound")
    return out


def format_table(report: ChaosReport) -> str:
    """The markdown tables of a run: each fault with its recovery, and the outcome counts per phase."""
    codes = sorted({c for counts in report.counts_by_phase.values() for c in counts}, key=lambda c: (c != OK, c))
    lines = ["| fault | target | at s | recovered after s | requests in flight: how they ended "
             "| failures ending before the next fault |", "|---|---|---:|---:|---|---|"]
    for r in report.faults:
        failures = ", ".join(f"{c} {n}" for c, n in sorted(r["failures_after"].items())) or "none"
        caught = ", ".join(f"{c} {n}" for c, n in r["in_flight"].items()) or "none"
        rec = "-" if r["recovery_s"] is None else f"{r['recovery_s']:.1f}"
        lines.append(f"| {r['kind']} | {r['target']} | {r['at_s']:.1f} | {rec} | {caught} | {failures} |")
    lines += ["", "| phase | " + " | ".join(codes) + " | all |", "|---|" + "---:|" * (len(codes) + 1)]
    for phase, counts in [*report.counts_by_phase.items(), ("all", report.counts)]:
        lines.append(f"| {phase} | " + " | ".join(str(counts.get(c, 0)) for c in codes)
                     + f" | {sum(counts.values())} |")
    return "\n".join(lines)
