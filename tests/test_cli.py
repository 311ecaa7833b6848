"""The CLI end to end on a tiny spec: build (the active baseline, then both), report, and the report's JSON."""

from __future__ import annotations

import json
import socket

import pytest
import yaml

from expertmesh import __version__
from expertmesh.cli import build_parser, main
from expertmesh.errors import (DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument, NotFound,
                               Unavailable)
from expertmesh.experts.spec import parse_spec
from expertmesh.experts.zoo import heldout_active_parameters, total_parameters

from conftest import tiny_spec_data


def test_zoo_build_and_report(tmp_path, capsys):
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text(yaml.safe_dump(tiny_spec_data()))
    zoo = tmp_path / "zoo"
    build = ["zoo", "build", "--spec", str(spec_file), "--zoo", str(zoo), "--no-progress"]
    assert main(build) == 0
    out = capsys.readouterr().out
    assert "12 trained" in out and "monolithic" in out and "monolithic_total" not in out  # 11 experts, 1 baseline
    report_file = tmp_path / "report.json"
    report_args = ["zoo", "report", "--spec", str(spec_file), "--zoo", str(zoo), "--json", str(report_file), "--no-progress"]
    # the matched-total baseline is built only when asked: the report names the command that builds it
    assert main(report_args) == 0
    out = capsys.readouterr().out
    assert "mono (active)" in out and "mono (total): not built for this spec; `expertmesh zoo build --only monolithic_total`" in out
    assert json.loads(report_file.read_text())["monolithic_total"] is None
    assert main(build + ["--baselines", "all"]) == 0
    out = capsys.readouterr().out
    assert "1 trained, 12 up to date" in out and "monolithic_total" in out
    assert main(build + ["--baselines", "all"]) == 0
    assert "0 trained, 13 up to date" in capsys.readouterr().out

    assert main(report_args) == 0
    out = capsys.readouterr().out
    assert "router accuracy" in out and "mono (active)" in out and "mono (total)" in out and "not built" not in out
    report = json.loads(report_file.read_text())
    assert report["coe"]["num_images"] == 49 * 2
    assert {e["expert"] for e in report["experts"]} >= {"component_classifier", "polarity", "solder_fine"}
    # the tiny zoo (a few epochs) finds nearly every defect (0.99 here) and is right on most verdicts (0.81), and the
    # table printed the JSON's figure
    assert report["coe"]["defect_recall"] >= 0.9 and report["coe"]["verdict_accuracy"] >= 0.75, report["coe"]
    assert f"{report['coe']['verdict_accuracy']:.4f}" in out and report["monolithic"]["total_parameters"] > 0
    assert report["coe"]["mean_experts_per_image"] >= 2  # the router and at least one expert
    # README ("The default CoE"): experts of ~80-170k parameters each; one baseline sized to the CoE's active
    # parameters per image on the held-out mix (the width whose parameter count comes closest: within 10%), one to
    # its total parameters
    assert all(75_000 <= e["num_parameters"] <= 175_000 for e in report["experts"]), report["experts"]
    expected = heldout_active_parameters(parse_spec(tiny_spec_data()))
    assert abs(report["monolithic"]["total_parameters"] - expected) <= 0.1 * expected, (expected, report["monolithic"])
    total = total_parameters(parse_spec(tiny_spec_data()))
    assert abs(report["monolithic_total"]["total_parameters"] - total) <= 0.05 * total, (total, report["monolithic_total"])
    assert report["monolithic_total"]["defect_recall"] is not None

    # `--json -`: standard output carries the report's JSON alone (the table goes to standard error)
    assert main(["zoo", "report", "--spec", str(spec_file), "--zoo", str(zoo), "--json", "-", "--no-progress"]) == 0
    captured = capsys.readouterr()
    streamed = json.loads(captured.out)
    assert streamed.pop("seconds") > 0 and streamed == {k: v for k, v in report.items() if k != "seconds"}
    assert "router accuracy" in captured.err

    # a threshold the tiny zoo cannot meet fails the command
    assert main(["zoo", "report", "--spec", str(spec_file), "--zoo", str(zoo), "--json", str(report_file),
                 "--no-progress", "--min-router-accuracy", "1.01"]) == 1


def test_report_without_zoo_names_the_fix(tmp_path, capsys):
    assert main(["zoo", "report", "--zoo", str(tmp_path), "--no-progress"]) == 2
    assert "expertmesh zoo build" in capsys.readouterr().err


def test_version_and_help_name_the_exit_codes(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"expertmesh {__version__}"
    assert "2 bad input" in build_parser().format_help() and "1 a runtime failure" in build_parser().format_help()


def test_exit_code_tells_bad_input_from_a_runtime_failure(capsys):
    """2: the caller must change what it passed; 1: the same command may work later (expertmesh.errors decides)."""
    assert [e("x").cli_exit_code for e in (InvalidArgument, NotFound, FailedPrecondition)] == [2, 2, 2]
    assert [e("x").cli_exit_code for e in (Unavailable, DeadlineExceeded, Internal)] == [1, 1, 1]
    with socket.socket() as s:  # a port nothing listens on: refused at once, not Ray's minutes of retries
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    assert main(["status", "--address", address]) == 1
    assert "no Ray cluster answers" in capsys.readouterr().err
    assert main(["zoo", "report", "--spec", "/nonexistent/spec.yaml", "--no-progress"]) == 2  # bad input
