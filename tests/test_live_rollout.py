"""Live expert changes on the shared Serve instance, under load: update, rollback, canary, promote, zero failures.

Revision 2 of the default spec updates `chip_defect` to a new checkpoint (its weights perturbed: another version),
adds an expert (`diode_second_opinion`, called for diodes), and removes `polarity` with its edges. Two stations send
traffic the whole time; every response must be OK and name the revision and expert versions that answered it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from expertmesh.bench.provenance import provenance
from expertmesh.cluster import rollout, rollout_store
from expertmesh.deployments import runner
from expertmesh.experts.images import encode_png
from expertmesh.experts.pcb_aoi import generator
from expertmesh.experts.revisions import expert_version
from expertmesh.experts.spec import load_spec, resolve_checkpoint
from expertmesh.rollout_command import apply, format_comparisons, read_comparisons
from expertmesh.v1 import inspection_pb2 as pb
from expertmesh.v1 import inspection_pb2_grpc as pb_grpc
from conftest import default_spec_data

pytestmark = pytest.mark.integration

PARTS = ("chip_resistor", "chip_capacitor", "diode", "soic", "led", "qfp")


@dataclass
class Answer:
    sent_s: float
    factory: str
    part: str
    code: grpc.StatusCode
    coe_version: str = ""
    experts: dict[str, str] | None = None  # expert -> version
    category: str = ""


class Stations:
    """Two stations (factory-a, factory-b) sending one request after another until stopped."""

    def __init__(self, serving) -> None:
        self.serving, self.answers, self._stop = serving, [], threading.Event()
        self.images = {p: [encode_png(generator.generate(p, d, 77, i)) for d in ("ok", "missing") for i in range(3)]
                       for p in PARTS}
        self.threads = [threading.Thread(target=self._run, args=(f,), daemon=True) for f in ("factory-a", "factory-b")]

    def _run(self, factory: str) -> None:
        meta = (("authorization", f"Bearer {self.serving.tokens[factory]}"),)
        with grpc.insecure_channel(self.serving.grpc_target) as ch:
            stub, i = pb_grpc.InspectionServiceStub(ch), 0
            while not self._stop.is_set():
                part = PARTS[i % len(PARTS)]
                image = self.images[part][(i // len(PARTS)) % len(self.images[part])]
                t0 = time.monotonic()
                try:
                    r = stub.Inspect(pb.InspectRequest(factory_id=factory, image=image), metadata=meta, timeout=30)
                    self.answers.append(Answer(t0, factory, part, grpc.StatusCode.OK, r.coe_version,
                                               {t.expert: t.version for t in r.experts}, r.category))
                except grpc.RpcError as err:
                    self.answers.append(Answer(t0, factory, part, err.code()))
                i += 1

    def __enter__(self) -> Stations:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        for t in self.threads:
            t.join(60)

    def since(self, t0: float, min_answers: int = 24, timeout_s: float = 60.0) -> list[Answer]:
        """The answers to requests sent after `t0` (waits for at least `min_answers`)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            got = [a for a in list(self.answers) if a.sent_s >= t0]
            if len(got) >= min_answers:
                return got
            time.sleep(0.2)
        raise AssertionError(f"only {len(got)} answers in {timeout_s} s")


@pytest.fixture(scope="module")
def revision_2(serving, tmp_path_factory):
    """Revision 2's spec file and its two new checkpoints (absolute paths: the zoo is not written to)."""
    d = tmp_path_factory.mktemp("revision-2")
    base = load_spec(serving.spec_path)
    new_chip = d / "chip_defect-v2"
    shutil.copytree(resolve_checkpoint(base.expert("chip_defect"), serving.zoo), new_chip)
    weights = load_file(new_chip / "model.safetensors")
    g = torch.Generator().manual_seed(2)
    save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in weights.items()}, new_chip / "model.safetensors")
    shutil.copytree(resolve_checkpoint(base.expert("diode_defect"), serving.zoo), d / "diode_second_opinion")
    data = copy.deepcopy(default_spec_data())
    data["version"] = 2
    for e in data["experts"]:
        if e["name"] == "chip_defect":
            e["checkpoint"] = str(new_chip)
    second = copy.deepcopy(next(e for e in data["experts"] if e["name"] == "diode_defect"))
    data["experts"] = [e for e in data["experts"] if e["name"] != "polarity"] + [
        {**second, "name": "diode_second_opinion", "checkpoint": str(d / "diode_second_opinion")}]
    data["dependencies"] = [x for x in data["dependencies"] if "polarity" not in (x["upstream"], x["downstream"])]
    for c in data["categories"]:
        if c["name"] == "diode":
            c["experts"] = c["experts"] + ["diode_second_opinion"]
    path = d / "spec-v2.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    spec = load_spec(path, zoo_root=serving.zoo)
    return path, expert_version(spec.expert("chip_defect"), new_chip)


STEPS: list[dict] = []  # every change applied: its steps' log lines and how long it took (the results file)


def change(serving, steps) -> float:
    lines: list[str] = []
    t0 = time.perf_counter()
    final = apply(serving.app_args, steps, log=lambda m: (print(m, flush=True), lines.append(m)))
    STEPS.append({"change": final.note, "steps": lines, "seconds": round(time.perf_counter() - t0, 2)})
    return time.monotonic()


def write_results(stations: Stations, phases: dict[str, list[Answer]], prefix: Path) -> None:
    """`EXPERTMESH_ROLLOUT_OUT=bench/results/rollout pytest -s tests/test_live_rollout.py`: what the README quotes."""
    codes = Counter(a.code.name for a in stations.answers)
    doc = {"provenance": provenance(),
           "command": "EXPERTMESH_ROLLOUT_OUT=bench/results/rollout python -m pytest -s tests/test_live_rollout.py",
           "requests": len(stations.answers), "codes": dict(codes), "changes": STEPS,
           "phases": {name: dict(Counter(a.coe_version for a in got)) for name, got in phases.items()}}
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.json").write_text(json.dumps(doc, indent=2) + "\n")
    rows = "\n".join(f"| {c['change']} | {len(c['steps'])} | {c['seconds']:.1f} |" for c in STEPS)
    phases_md = "\n".join(f"| {name} | {', '.join(f'{v}: {n}' for v, n in sorted(got.items()))} |"
                           for name, got in doc["phases"].items())
    Path(f"{prefix}.md").write_text(
        f"# Live expert changes under load (tests/test_live_rollout.py)\n\nCommit {doc['provenance']['commit']}, "
        f"{doc['provenance']['date']}; `{doc['command']}`.\n\n{doc['requests']} requests from two stations sent back to "
        f"back during the changes: {', '.join(f'{k} {v}' for k, v in sorted(codes.items()))}.\n\n"
        f"| change | steps | seconds |\n|---|---|---|\n{rows}\n\n"
        f"| answers sent after the change | revisions that answered |\n|---|---|\n{phases_md}\n")


def test_experts_change_under_load_with_no_failed_request(serving, revision_2):
    spec_path, v2_chip = str(revision_2[0]), revision_2[1]
    base = load_spec(serving.spec_path)
    v1_chip = expert_version(base.expert("chip_defect"), resolve_checkpoint(base.expert("chip_defect"), serving.zoo))
    assert v1_chip != v2_chip
    phases: dict[str, list[Answer]] = {}
    try:
        with Stations(serving) as stations:
            before = phases["before"] = stations.since(time.monotonic())
            assert {a.coe_version for a in before} == {"pcb-aoi@1"}
            assert {a.experts["chip_defect"] for a in before if a.part.startswith("chip")} == {v1_chip}

            # update: every request answered by revision 2, with the new chip_defect, the added and no removed expert
            after = phases["update"] = stations.since(change(serving, rollout.update(rollout_store.read(), spec_path)))
            assert {a.coe_version for a in after} == {"pcb-aoi@2"}
            assert {a.experts["chip_defect"] for a in after if a.part.startswith("chip")} == {v2_chip}
            diodes = [a for a in after if a.category == "diode"]
            assert diodes and all("diode_second_opinion" in a.experts for a in diodes)
            assert not any("polarity" in a.experts for a in after)

            # rollback: one command, revision 1 again, polarity back
            after = phases["rollback"] = stations.since(change(serving, rollout.rollback(rollout_store.read())),
                                                      min_answers=80)  # enough polarized parts to see polarity
            assert {a.coe_version for a in after} == {"pcb-aoi@1"}
            assert any("polarity" in a.experts for a in after if a.part in ("diode", "soic", "led"))

            # canary: half of factory-a's requests on revision 2, none of factory-b's; agreement counted
            t0 = change(serving, rollout.start_canary(rollout_store.read(), spec_path, "factory-a", 0.5))
            after = phases["canary (factory-a 50%)"] = stations.since(t0, min_answers=40)
            assert {a.coe_version for a in after if a.factory == "factory-b"} == {"pcb-aoi@1"}
            on_canary = [a.coe_version == "pcb-aoi@2" for a in after if a.factory == "factory-a"]
            assert 0.3 <= sum(on_canary) / len(on_canary) <= 0.7, on_canary

            # promote: revision 2 for everyone
            after = phases["promote"] = stations.since(change(serving, rollout.promote(rollout_store.read())))
            assert {a.coe_version for a in after} == {"pcb-aoi@2"}
        if os.environ.get("EXPERTMESH_ROLLOUT_OUT"):
            write_results(stations, phases, Path(os.environ["EXPERTMESH_ROLLOUT_OUT"]))
        failed = [a for a in stations.answers if a.code != grpc.StatusCode.OK]
        assert not failed and len(stations.answers) > 150, (len(failed), failed[:3])
    finally:
        rollout_store.clear()
        runner.redeploy(serving.app_args)

    found = {}
    deadline = time.monotonic() + 30  # Ray reports metrics every second here
    while time.monotonic() < deadline and not found:  # (another CoE's canary may have run on the shared instance)
        found = {k: v for k, v in read_comparisons().items() if k[0].startswith("pcb-aoi@")}
        time.sleep(1)
    (canary, stable, _), outcomes = next(iter(found.items()))
    assert (canary, stable) == ("pcb-aoi@2", "pcb-aoi@1") and sum(outcomes.values()) > 0
    assert "agreement" in format_comparisons(found, {"pcb-aoi": rollout_store.read()})


def test_rollout_cli_reports_state_and_refuses_a_bad_change(serving, tmp_path):
    """The command a user runs, as a separate process joining the cluster."""
    import ray

    address = ray.get_runtime_context().gcs_address
    cli = [sys.executable, "-m", "expertmesh.cli", "rollout"]
    out = subprocess.run(cli + ["status", "--address", address], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr
    assert "stable:   pcb-aoi@1" in out.stdout
    bad = tmp_path / "bad.yaml"
    data = default_spec_data()
    data["experts"][1]["checkpoint"] = "/nonexistent/chip_defect"
    bad.write_text(yaml.safe_dump(data))
    out = subprocess.run(cli + ["update", str(bad), "--address", address], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 2 and "experts[1].checkpoint" in out.stderr, out.stderr
    out = subprocess.run(cli + ["rollback", "--address", address], capture_output=True, text=True, timeout=240)
    assert out.returncode == 2 and "nothing to roll back to" in out.stderr, out.stderr
