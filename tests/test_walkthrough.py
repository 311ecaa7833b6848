"""The walk-through runner both README demos use (bench/walkthrough.py): the real CLI, one command after another,
the log written with the demo folder as `$DEMO`, stopping at the first command that fails."""

from __future__ import annotations

from expertmesh.bench.walkthrough import record


def test_record_runs_the_commands_and_stops_at_the_first_failure(tmp_path):
    out = tmp_path / "log.txt"
    steps = [["expertmesh", "spec", "check", "--skip-checkpoints"],
             ["expertmesh", "spec", "check", str(tmp_path / "absent.yaml")],
             ["expertmesh", "spec", "check", "--skip-checkpoints"]]
    rc = record(tmp_path, out, target="x-demo", script="bench/x.py", summary="3 images", steps=steps, timed=True)
    log = out.read_text()
    assert rc == 2 and log.startswith(f"# `make x-demo` (bench/x.py run $DEMO), ")
    assert "$ python bench/x.py export $DEMO\n3 images\n" in log and str(tmp_path) not in log
    assert log.count("$ expertmesh spec check") == 2 and "$DEMO/absent.yaml" in log  # the third never ran
    assert "embedded spec: OK" in log and log.rstrip().endswith("(exit code 2)") and " s)\n" in log
