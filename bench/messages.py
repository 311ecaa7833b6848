"""What a typed trace costs between processes: Ray pickles what a host returns to the router and the router to the
ingress, so the trace entry's type was chosen by this (`router/trace.py`).

  python -m expertmesh.bench.messages [--out bench/results/messages]

One host answer of a batch (64 rows, 3 entries each, as a wave of the default CoE carries) pickled and unpickled,
as a plain dict per entry (the design before), `router.trace.TraceEntry` (a dataclass with slots pickled as a
tuple of plain values: chosen), and a pydantic model of the same fields; the median of 7 runs of 200 round trips
each, and the bytes. Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import sys
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from expertmesh.bench.provenance import provenance
from expertmesh.router.plan import Reason
from expertmesh.router.trace import TraceEntry

ROWS, PER_ROW, ROUND_TRIPS, RUNS = 64, 3, 200, 7


class TraceModel(BaseModel):  # the pydantic alternative, the same fields
    model_config = ConfigDict(frozen=True)
    expert: str
    label: str
    score: float
    reason: Reason
    because_of: str = ""
    latency_ms: float = 0.0
    batch_size: int = 0
    readiness: str = "ready"
    node_id: str = ""
    replica_id: str = ""
    version: str = ""


def answers() -> dict[str, list]:
    """The same host answer three ways; every entry its own object with its own numbers (as a real answer's are)."""
    rows = [[TraceEntry(f"expert_{j}", "ok", 0.9 - j / 10 - i / 1e4, Reason.TABLE, "", 3.5 + i / 7, 16, "ready",
                        "node-1", "abc123") for j in range(PER_ROW)] for i in range(ROWS)]

    def as_dict(e: TraceEntry) -> dict:
        return {"latency_ms": e.latency_ms, "batch_size": e.batch_size, "readiness": e.readiness,
                "node_id": e.node_id, "replica_id": e.replica_id, "expert": e.expert, "label": e.label,
                "score": e.score, "reason": e.reason.value, "because_of": e.because_of}

    def as_model(e: TraceEntry) -> TraceModel:
        return TraceModel(**{k: getattr(e, k) for k in TraceEntry.__slots__})

    return {kind: [{"trace": [make(e) for e in row], "pending": [], "planned": []} for row in rows]
            for kind, make in (("dict", as_dict), ("dataclass", lambda e: e), ("pydantic", as_model))}


def measure() -> dict:
    out = {}
    for kind, payload in answers().items():
        runs = []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            for _ in range(ROUND_TRIPS):
                pickle.loads(pickle.dumps(payload, protocol=5))
            runs.append((time.perf_counter() - t0) / ROUND_TRIPS * 1e6)
        out[kind] = {"round_trip_us": statistics.median(runs), "bytes": len(pickle.dumps(payload, protocol=5))}
    base = out["dict"]["round_trip_us"]
    for v in out.values():
        v["vs_dict"] = v["round_trip_us"] / base
    return out


def markdown(doc: dict) -> str:
    lines = ["# A host's answer pickled and unpickled (`python -m expertmesh.bench.messages`)", "",
             f"Measured {doc['date']} at {(doc['commit'] or '?')[:7]}: {ROWS} rows x {PER_ROW} trace entries, median of "
             f"{RUNS} runs of {ROUND_TRIPS} round trips.", "",
             "| trace entry as | round trip, us | vs dict | bytes |", "|---|--:|--:|--:|"]
    names = {"dict": "dict (before)", "dataclass": "TraceEntry: dataclass, pickled as a tuple (chosen)",
             "pydantic": "pydantic model"}
    for kind, v in doc["results"].items():
        lines.append(f"| {names[kind]} | {v['round_trip_us']:.0f} | {v['vs_dict']:.2f}x | {v['bytes']:,} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("bench/results/messages"))
    args = p.parse_args(argv)
    doc = {"benchmark": "messages", **provenance(), "results": measure()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
