"""A trace entry: one expert's answer to one request, as every process hands it on (expert host -> router ->
ingress -> the wire -> the station's records). Defined once here, with the one list of the fields that reach the
wire (`WIRE_FIELDS`, the proto's `ExpertTrace`) and the one JSON form of them (`wire`).

A dataclass with slots, pickled as a tuple of plain values (`__reduce__`): Ray pickles every host answer, and this
way an entry costs about 1.5x the plain dict it replaced (half a microsecond more per entry), where the dataclass's default
pickling, or a pydantic model, cost five to six times the dict (`python -m expertmesh.bench.messages`,
bench/results/messages.md). Nothing in it assumes an image:
`label` is whatever the expert answered.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from expertmesh.router.plan import Call, ExpertOutput, Reason

#: What a client sees of an entry, in order: the fields of `expertmesh.v1.ExpertTrace` and of the HTTP JSON.
WIRE_FIELDS = ("expert", "label", "score", "latency_ms", "reason", "because_of", "node_id", "replica_id", "version")


@dataclass(slots=True)
class TraceEntry:
    """Treated as immutable (`named` returns a copy); not frozen, because a frozen dataclass's __init__ doubled the
    cost of every unpickle."""

    expert: str
    label: str
    score: float
    reason: Reason
    because_of: str = ""  # the rule, or the upstream expert whose answer triggered this one
    latency_ms: float = 0.0
    batch_size: int = 0  # the batch the answer came from (not on the wire)
    readiness: str = "ready"  # ready, or waited_load: the weights were not on the device (not on the wire)
    node_id: str = ""
    replica_id: str = ""
    version: str = ""  # the expert's version (a digest of architecture, labels, checkpoint bytes); set by the router

    def __reduce__(self):
        """Pickled as one tuple of plain values (Ray pickles every host answer): about 1.5x the dict it replaced,
        where the default for a slotted dataclass (and pickling the Reason enum by reference) cost five times it."""
        return _rebuild, (self.expert, self.label, self.score, self.reason.value, self.because_of, self.latency_ms,
                          self.batch_size, self.readiness, self.node_id, self.replica_id, self.version)

    def output(self) -> ExpertOutput:
        return ExpertOutput(self.expert, self.label, self.score)

    def call(self) -> Call:
        """The call this entry answered (what the plan state merges)."""
        return Call(self.expert, self.reason, self.because_of or None)

    def named(self, expert: str, version: str) -> TraceEntry:
        """The entry under the expert's public name and version (a revision's internal names stay inside)."""
        return replace(self, expert=expert, version=version)

    def wire(self) -> dict[str, Any]:
        """The fields of WIRE_FIELDS as JSON values (`reason` as its string): the HTTP answer and the proto's kwargs."""
        return {"expert": self.expert, "label": self.label, "score": float(self.score),
                "latency_ms": float(self.latency_ms), "reason": self.reason.value, "because_of": self.because_of,
                "node_id": self.node_id, "replica_id": self.replica_id, "version": self.version}

    @classmethod
    def from_wire(cls, msg: Any) -> TraceEntry:
        """An entry read back from a response: a proto `ExpertTrace` (attributes) or the HTTP JSON (a dict)."""
        get = msg.get if isinstance(msg, dict) else (lambda k, default=None: getattr(msg, k, default))
        return cls(**{k: get(k, "") for k in WIRE_FIELDS if k != "reason"}, reason=Reason(get("reason", "")))



def _rebuild(expert, label, score, reason, because_of, latency_ms, batch_size, readiness, node_id, replica_id,
             version) -> TraceEntry:
    return TraceEntry(expert, label, score, _REASONS[reason], because_of, latency_ms, batch_size, readiness, node_id,
                      replica_id, version)


_REASONS = {r.value: r for r in Reason}
