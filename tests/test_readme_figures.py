"""The README's figures are what docs/figures/*.json say, and each file says which command and commit made it.

Pure: reads README.md and the results files (no Ray). `python bench/figures.py render` rewrites the README's
blocks from the files; `make figures` measures them again.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import figure_blocks as blocks  # noqa: E402  (bench/ is scripts, not a package)
import figure_parse as parse  # noqa: E402

README = blocks.all_documents_text(ROOT)  # README.md and docs/*.md: a block quotes its figures where its section is
RESULTS = blocks.load_results(ROOT)


def test_every_readme_block_matches_its_results_file():
    problems = blocks.stale_blocks(README, RESULTS)
    assert problems == [], "README.md disagrees with docs/figures:\n" + "\n".join(problems)


def test_every_group_has_a_results_file_and_a_markdown_copy():
    files = sorted(p.stem for p in (ROOT / blocks.FIGURES_DIR).glob("*.json"))
    unmeasured = blocks.unmeasured_groups(README, RESULTS)
    assert files == [g for g in blocks.GROUPS if g not in unmeasured], \
        "every docs/figures/*.json is quoted by the README, and every quoted group has one"
    assert not unmeasured, f"groups with no results file and no README block: {unmeasured}"
    for group in files:
        md = (ROOT / blocks.FIGURES_DIR / f"{group}.md").read_text()
        assert md == blocks.group_markdown(group, RESULTS), f"{group}.md is stale; run python bench/figures.py render"


@pytest.mark.parametrize("group", blocks.GROUPS)
def test_each_file_says_when_and_how_it_was_made(group):
    if group not in RESULTS:
        pytest.skip(f"{group} is not measured yet (no {blocks.FIGURES_DIR}/{group}.json, no README block)")
    r = RESULTS[group]
    assert r["figure"] == group
    assert re.fullmatch(r"[0-9a-f]{40}", r["commit"]), r["commit"]
    assert dt.datetime.fromisoformat(r["date"]).tzinfo is not None, "dates are UTC with their offset"
    assert r["command"].strip()
    assert r["provenance"] in ("measured", "transcribed")
    if r["provenance"] == "transcribed":
        assert "transcribed" in r["note"], "a transcribed file says where from"
    assert isinstance(r["data"], dict) and r["data"]


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize("group", blocks.GROUPS)
def test_each_files_commit_is_in_the_history(group):
    if group not in RESULTS:
        pytest.skip(f"{group} is not measured yet")
    sha = RESULTS[group]["commit"]
    known = subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=ROOT, capture_output=True)
    if known.returncode != 0 and (ROOT / ".git" / "shallow").exists():
        pytest.skip("shallow clone")
    assert known.returncode == 0, f"{group}.json names commit {sha}, which this repository does not have"


def test_a_figure_that_moves_in_the_file_fails_the_check():
    changed = copy.deepcopy(RESULTS)
    changed["make_run"]["data"]["station"]["p50_ms"] += 1.0
    assert [p for p in blocks.stale_blocks(README, changed) if "make_run.station" in p]
    changed = copy.deepcopy(RESULTS)
    changed["node_loss"]["data"]["clusters"]["make_run"]["replan"]["running_after_s"] += 5
    stale = blocks.stale_blocks(README, changed)
    assert any("node_loss.range" in p for p in stale) and any("'node_loss'" in p for p in stale)


def test_a_figure_edited_in_the_readme_fails_the_check():
    body = blocks.blocks(README)["accuracy"]
    number = re.search(r"\d\.\d{4}", body)[0]
    edited = README.replace(body, body.replace(number, "0.1234", 1))
    assert [p for p in blocks.stale_blocks(edited, RESULTS) if "'accuracy'" in p]
    removed = README.replace("<!-- figures:ci -->", "").replace("<!-- /figures:ci -->", "")
    assert any("no block 'ci'" in p for p in blocks.stale_blocks(removed, RESULTS))


# ------------------------------------------------------------------------------ throughput: before and now
@pytest.fixture
def throughput_results() -> dict:
    """A throughput record as `figures.py refresh throughput` writes it, `now` a copy of the committed before-run
    (so the block renders before bench/results/throughput.json exists), with a few figures of its own."""
    before = json.loads((ROOT / "bench" / "results" / "throughput-before.json").read_text())
    now = copy.deepcopy(before)
    now.update(commit="0123456789" * 4, date="2026-11-27T10:00:00+00:00")
    now["single"]["capacity_per_s"] = 120.0
    now["board"]["highest_rate_meeting_target_components_per_s"] = 284.0
    now["overload"]["board"].update(fraction_of_capacity=0.97, num_refused=20, num_deadline_exceeded=0)
    record = {"figure": "throughput", "commit": now["commit"], "worktree_dirty": False, "date": now["date"],
              "command": "expertmesh bench throughput --before bench/results/throughput-before.json",
              "machine": "Linux, 2 cpus", "load_average_1_5_15m": [1.0, 1.5, 1.5], "provenance": "measured",
              "note": "", "data": {"before": before, "now": now}}
    return {**RESULTS, "throughput": record}


def test_the_throughput_block_compares_before_and_now(throughput_results):
    body = blocks.render_block("throughput", throughput_results)
    rows = {ln.split(" | ")[0].lstrip("| "): ln.split(" | ")[1:] for ln in body.splitlines() if ln.startswith("| ")}
    assert rows["`expertmesh bench throughput`"] == ["before (bfe234c)", "now (0123456) |"]
    assert rows["offline bound (one process, batched), components/s"] == ["567.5", "567.5 |"]
    assert rows["no-op Serve gRPC app, requests/s: capacity / highest rate with p99 <= 250 ms"][0] == "177.0 / 168.2"
    single = rows["single Inspect, components/s: capacity / highest rate with p99 <= 250 ms (share of the no-op's)"]
    assert single == ["25.3 / 14.1 (8%)", "120.0 / 14.1 (8%) |"]
    board = rows["boards of 50, components/s: capacity / highest rate with board p99 <= 1 s (share of offline bound)"]
    assert board == ["44.7 / -", "44.7 / 284.0 (50%) |"]
    assert rows["boards at 3x capacity: throughput"] == [
        "9% of capacity; 0 refused, 12 past deadline of 14", "97% of capacity; 20 refused, 0 past deadline of 14 |"]
    assert rows["deploy to first answer, s"] == ["66.2", "66.2 |"]
    assert rows["replicas' RSS after load (processes)"][0] == "6,159 MiB (13)"
    assert "throughput-before.json` at 0123456, 2026-11-27" in " ".join(body.split())
    assert "(/bench/results/throughput.md)" in body and "(/bench/results/throughput.png)" in body  # from the root


def test_a_throughput_block_needs_its_file_and_its_file_needs_a_block(throughput_results):
    only = {"throughput": throughput_results["throughput"]}
    block = "text\n<!-- figures:throughput -->\n<!-- /figures:throughput -->\n"
    assert blocks.stale_blocks(block, {}) == [
        "no docs/figures/throughput.json for README block 'throughput'; run `make figures FIGURES=throughput`"]
    assert blocks.stale_blocks("text\n", {}) == [], "no file and no block: not measured yet, not a failure"
    assert blocks.unmeasured_groups("text\n", {}) == blocks.GROUPS
    assert blocks.stale_blocks("text\n", only) == [
        "README has no block 'throughput' (<!-- figures:throughput -->...<!-- /figures:throughput -->)"]
    assert blocks.stale_blocks(blocks.render_readme(block, only), only) == []


def test_a_readme_block_with_no_renderer_is_named():
    stale = blocks.stale_blocks(README + "<!-- figures:gone -->x<!-- /figures:gone -->", RESULTS)
    assert any("'gone' has no renderer" in p and "remove the block" in p for p in stale)


def test_numbers_round_half_up():
    assert blocks.num(0.75, 1) == "0.8" and blocks.num(0.9697 * 100 - 0.9622 * 100, 1) == "0.8"
    assert blocks.span(33, 41) == "33-41" and blocks.span(33.8, 33.8, 1) == "33.8"


# ------------------------------------------------------------------------------ the parsers of command output
STATION = """station -> 127.0.0.1:9000: 200 requests in 20.0 s, 300 components answered (15.0 components/s)
latency p50 53.0 ms, p99 224.9 ms; verdict accuracy 0.9900
errors by code: DEADLINE_EXCEEDED 11, UNAVAILABLE 2
expert hits: component_classifier 300, chip_defect 180, qfp_defect 2
expert hit rate (Prometheus, since start):
  chip_defect              0.994
  qfp_defect               0.000
"""


def test_station_and_hit_rates_parse():
    s = parse.station(STATION)
    assert (s["num_sent"], s["num_components"], s["p50_ms"], s["p99_ms"]) == (200, 300, 53.0, 224.9)
    assert s["errors_by_code"] == {"DEADLINE_EXCEEDED": 11, "UNAVAILABLE": 2}
    assert s["experts_hit"]["qfp_defect"] == 2
    assert parse.station(STATION.replace("DEADLINE_EXCEEDED 11, UNAVAILABLE 2", "none"))["errors_by_code"] == {}
    assert parse.hit_rates(STATION) == {"chip_defect": 0.994, "qfp_defect": 0.0}


def test_a_changed_output_format_fails_loudly():
    with pytest.raises(parse.FigureParseError, match="station summary"):
        parse.station(STATION.replace("components answered", "answered"))
    with pytest.raises(parse.FigureParseError, match="pytest summary"):
        parse.pytest_summary("all good")


def test_pytest_summary_counts_tests():
    out = parse.pytest_summary("...\n======= 190 passed, 3 skipped, 2 warnings in 378.21s (0:06:18) =======\n")
    assert out["num_tests"] == 193 and out["counts"]["passed"] == 190 and out["seconds"] == 378.21


def test_the_profile_table_parses_back_to_its_rows():
    d = RESULTS["profile"]["data"]
    table, rows = parse.profile_table(d["table_text"] + "\n")
    assert table == d["table_text"] and rows == d["rows"]


def test_the_plan_header_parses():
    assert parse.plan_header(RESULTS["plan"]["data"]["printout"])["method"] == "exact"


NODE_LOSS_LOG = """co-location: 126/126 inspections of 96 requests ran their plan on one node (plan cut 0)
[placement] re-planning: node lost: node-1
[placement] re-planned and applied in 1.7 s (node lost: node-1; planned in 0.0 s): moved polarity, soic_defect, \
solder_fine; cut 0 of 4.79 calls/s; component_classifier@node-0+node-2, polarity@node-2, soic_defect@node-2, \
solder_fine@node-2+node-0
[placement] re-planned and applied in 0.4 s (traffic drift; planned in 0.1 s): moved nothing; cut 0 of 5 calls/s; \
polarity@node-2
node node-1 removed: re-planning began 0.4 s after, the new placement was running 2.1 s after (1.7 s to plan and \
apply, 0.0 s to plan)
lost experts answering again after 3.9 s: polarity 1.5 s, soic_defect 3.9 s
station during the loss: 180 requests, {'OK': 170, 'UNAVAILABLE': 10}
requests past 30 s (the station's deadline in the issue): 0
.
1 passed, 2 deselected in 459.31s (0:07:39)
"""


SHORT_LOSS_LOG = """co-location: 111/126 inspections of 96 requests ran their plan on one node (plan cut 0.5841)
[placement] re-planning: node lost: node-1
[placement] re-planned and applied in 1.0 s (node lost: node-1; planned in 0.2 s): moved chip_defect, qfp_defect; \
memory short, off the device: general_defect, solder_fine; cut 0.101 of 4.72 calls/s; chip_defect@node-0, \
general_defect@node-2, qfp_defect@node-2, solder_fine@node-0
node node-1 removed: re-planning began -0.1 s after, the new placement was running 2.4 s after (1.0 s to plan and \
apply, 0.2 s to plan)
station during the loss: 180 requests, {'OK': 180}
requests past 30 s (the station's deadline in the issue): 0
.
1 passed, 3 deselected in 163.27s (0:02:43)
"""


def test_a_degraded_replan_parses():
    """Memory short after the loss: the log line names the experts off the device; a re-plan that began before the
    removal command returned parses (a negative start)."""
    f = parse.node_loss_test(SHORT_LOSS_LOG)
    assert f["moved"] == ["chip_defect", "qfp_defect"] and f["off_the_device"] == ["general_defect", "solder_fine"]
    assert f["replan"]["began_s"] == -0.1 and f["cut_after"] == "0.101" and f["recovery"] is None
    assert f["placement_after"]["solder_fine"] == ["node-0"]


def test_node_loss_output_parses():
    f = parse.node_loss_test(NODE_LOSS_LOG)
    assert f["victim"] == "node-1" and f["moved"] == ["polarity", "soic_defect", "solder_fine"]
    assert f["replan"] == {"reason": "node lost: node-1", "began_s": 0.4, "running_after_s": 2.1, "plan_apply_s": 1.7,
                           "plan_s": 0.0}
    assert f["moved_to"]["solder_fine"] == ["node-2", "node-0"] and f["placement_after"]["polarity"] == ["node-2"]
    assert (f["cut_after"], f["total_weight"]) == ("0", "4.79"), "the first re-plan after the loss, not a later one"
    assert f["colocation"] == {"one_node": 126, "inspections": 126, "requests": 96, "plan_cut": "0"}
    assert f["recovery"] == {"max_s": 3.9, "by_expert_s": {"polarity": 1.5, "soic_defect": 3.9}}
    assert f["requests_past_30_s"] == 0 and f["station"] == {"num_sent": 180, "codes": {"OK": 170, "UNAVAILABLE": 10}}
    assert parse.pytest_summary(NODE_LOSS_LOG)["counts"] == {"passed": 1, "deselected": 2}, "pytest -q's bare line"


def test_node_loss_output_without_a_lost_expert_hit_or_with_an_old_line_format():
    no_hit = "\n".join(ln for ln in NODE_LOSS_LOG.splitlines() if not ln.startswith("lost experts"))
    assert parse.node_loss_test(no_hit)["recovery"] is None
    with pytest.raises(parse.FigureParseError, match="co-location line"):
        parse.node_loss_test(NODE_LOSS_LOG.replace("126/126 inspections of 96 requests", "95/96 requests"))
    with pytest.raises(parse.FigureParseError, match="codes are not a dict"):
        parse.node_loss_test(NODE_LOSS_LOG.replace("{'OK': 170, 'UNAVAILABLE': 10}", "{'OK': 'many'}"))


def test_the_node_loss_block_quotes_its_file():
    f, short = parse.node_loss_test(NODE_LOSS_LOG), parse.node_loss_test(SHORT_LOSS_LOG)
    station = {"rate_per_s": 4, "duration_s": 45}
    record = {**RESULTS["node_loss"], "provenance": "measured", "commit": "0123456789" * 4,
              "date": "2026-11-26T10:00:00+00:00", "load_average_1_5_15m": None,
              "data": {"clusters": {
                  "make_run": {"node_memory_gb": 0.06, "profile_max_batch": None, **f,
                               "station": {**station, **f["station"]}},
                  "memory_short": {"node_memory_gb": 0.005, "profile_max_batch": 2, **short,
                                   "station": {**station, **short["station"]}}}, "before_pooled_hosts": None}}
    results = {**RESULTS, "node_loss": record}
    body = " ".join(blocks.render_block("node_loss", results).split())
    assert "answered from a surviving expert host as soon as the router sees the node gone" in body
    assert "within 3.9 s of the loss" in body and "1.5-3.9 s, soic_defect the last" in body
    assert "moves 3 experts (polarity, soic, solder_fine) onto the hosts on node-0 and node-2" in body
    assert "running 2.1 s after the loss (1.7 s to plan and apply)" in body
    assert "180 requests all ended: 170 answered, 10 explicit UNAVAILABLE; 0 took longer than 30 s" in body
    assert "so general and solder_fine start off the device" in body and "running 2.4 s after the loss" in body
    assert "126 of 126 inspections (96 requests)" in body and "Before issue 12" not in body
    assert blocks.render_block("node_loss.range", results) == "2.1 s (memory short after the loss: 2.4 s)"
    assert blocks.render_block("node_loss.colocation", results) == "126 of 126 inspections (96 requests)"
    make_run = record["data"]["clusters"]["make_run"]
    make_run["recovery"], make_run["station"]["codes"] = None, {"OK": 180}
    make_run["moved_to"]["solder_fine"] = ["node-2"]
    body = " ".join(blocks.render_block("node_loss", results).split())
    assert "no request sent after the loss needed one of the lost experts" in body
    assert "180 requests were all answered; 0 took" in body and "onto the host on node-2 and nothing else" in body


ZOO_BUILD_LOG = """building zoo of 'pcb-aoi' into /tmp/zoo
training 2 model(s): component_classifier, chip_defect
[1/2] component_classifier: 9000 images x 10 epochs in 120.5 s, train accuracy 0.999, 80,000 parameters -> /tmp/zoo/c
[2/2] chip_defect: 3200 images x 12 epochs in 30.0 s, train accuracy 0.998, validation accuracy 0.990 (320 images, \
epoch 11 kept), 79,572 parameters -> /tmp/zoo/chip_defect
zoo build done in 240.0 s: 2 trained, 0 up to date
"""


def test_the_zoo_build_output_parses():
    b = parse.zoo_build(ZOO_BUILD_LOG)
    assert (b["build_s"], b["num_trained"], b["num_up_to_date"]) == (240.0, 2, 0)
    assert b["models"]["chip_defect"] == {"num_images": 3200, "epochs": 12, "train_s": 30.0}
    with pytest.raises(parse.FigureParseError, match="prints 1"):
        parse.zoo_build(ZOO_BUILD_LOG.replace("[1/2] component_classifier", "component_classifier"))


def test_the_training_blocks_quote_their_file():
    b = parse.zoo_build(ZOO_BUILD_LOG)
    data = {"wall_s": 255.4, "build_s": 240.0, "startup_s": 15.4, "images_s": 70.2, "models_train_s": 150.5,
            "other_s": 19.3, "num_models": 2, "models": b["models"], "cpu_count": 2, "baselines": "none"}
    record = {"figure": "training", "commit": "0123456789" * 4, "worktree_dirty": False,
              "date": "2026-11-27T10:00:00+00:00", "command": "expertmesh zoo build --zoo TMP --baselines none",
              "machine": "Linux, 2 cpus", "load_average_1_5_15m": [1.0, 1.5, 1.5], "provenance": "measured",
              "note": "", "data": data}
    results = {**RESULTS, "training": record}
    body = " ".join(blocks.render_block("training", results).split())
    assert body.startswith("- **Measured:** `make run` trains the 2 experts in 255 s on this 2-core machine")
    assert "151 s training the experts (the slowest `component_classifier`, 121 s), 70 s generating the images" in body
    assert "(/docs/figures/training.json): `expertmesh zoo build --zoo TMP --baselines none` at 0123456, 2026-11-27" in body
    assert blocks.render_block("training.total", results) == "255 s"
    assert blocks.render_block("training.split", results).startswith("255 s on 2 cores, measured: the experts 151 s")
