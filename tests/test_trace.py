"""The trace entry, defined once (router/trace.py): its wire fields are the proto's ExpertTrace, and the proto, the
HTTP JSON and Ray's pickling all carry it whole."""

from __future__ import annotations

import json
import pickle

from expertmesh.router.plan import Call, ExpertOutput, Reason
from expertmesh.router.trace import WIRE_FIELDS, TraceEntry
from expertmesh.v1 import inspection_pb2 as pb

ENTRY = TraceEntry("solder_fine", "solder_bridge", 0.875, Reason.DEPENDENCY, "chip_defect", 12.5, 8, "waited_load",
                   "node-1", "r1", "v3")


def test_the_wire_fields_are_the_protos():
    assert WIRE_FIELDS == tuple(f.name for f in pb.ExpertTrace.DESCRIPTOR.fields)


def test_proto_json_and_pickle_carry_an_entry_whole():
    on_wire = ENTRY.wire()
    assert list(on_wire) == list(WIRE_FIELDS) and on_wire["reason"] == "dependency"
    assert TraceEntry.from_wire(pb.ExpertTrace(**ENTRY.wire())).wire() == ENTRY.wire()  # gRPC (score as float32)
    assert TraceEntry.from_wire(json.loads(json.dumps(ENTRY.wire()))).wire() == ENTRY.wire()  # HTTP
    assert pickle.loads(pickle.dumps(ENTRY)) == ENTRY  # between Ray processes: the batch and readiness too


def test_an_entry_is_the_call_it_answered_and_the_output_it_gave():
    assert ENTRY.call() == Call("solder_fine", Reason.DEPENDENCY, "chip_defect")
    assert ENTRY.output() == ExpertOutput("solder_fine", "solder_bridge", 0.875)
    assert TraceEntry("r", "qfp", 0.9, Reason.ROUTER).call().because_of is None
    named = ENTRY.named("solder", "v9")
    assert (named.expert, named.version, named.label) == ("solder", "v9", "solder_bridge")
