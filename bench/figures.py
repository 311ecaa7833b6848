"""Every figure the README quotes, made by a command and kept in docs/figures/<group>.json.

  python bench/figures.py refresh [GROUP ...|all]  run each group's command, write its file, rewrite the README blocks
  python bench/figures.py render                   rewrite the README's figure blocks (and docs/figures/*.md)
  python bench/figures.py check                    exit 1 when a README block disagrees with its file

`make figures [FIGURES="accuracy plan"]` is `refresh`. A results file is {"figure", "commit" (HEAD when measured),
"worktree_dirty", "date" (UTC), "command", "machine", "load_average_1_5_15m" (this machine is shared),
"provenance" ("measured" or "transcribed"), "note", "data"}.
Groups and what measures them (the last four start Ray, serve and take minutes):
  accuracy    expertmesh zoo report                     (the accuracy table; builds both baselines first)
  profile     expertmesh profile --force                (profile table, timings, usage; docs/profile-pcb-aoi.png)
  plan        expertmesh plan --explain                 (3 nodes of 0.06 GiB; 0.05 GiB exact and heuristic)
  training    expertmesh zoo build --zoo TMP            (`make run`'s training into a fresh zoo; ~12 min)
  throughput  expertmesh bench throughput --before ...  (before/now capacities, overload, ready time, RSS; ~15 min)
  make_run    make run                                  (station figures, readiness, hit rates from Prometheus)
  node_loss   pytest -s the 3-node node-loss test       (lost experts answering again, re-plan timings, the station)
  kuberay     pytest -s the KubeRay-style placement test (first placement, re-plan after a lost pod, re-submission)
  ci          bash .ci/run on a clean clone             (CI time by phase, pytest's summary)
`refresh --from-results throughput` records an existing bench/results/throughput.json instead of re-running the bench
(the file keeps the commit, date and load of the run that made it); `refresh --from-log FILE [--commit SHA] node_loss`
records a saved `pytest -s` output of the node-loss test (measured at SHA, default HEAD) instead of running it, and
writes nothing when that run did not pass. `check` passes a group that has neither a results file nor a README block
yet (it says so).
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import figure_blocks as blocks
import figure_parse as parse
from expertmesh.home import expertmesh_home
from expertmesh.station import run_station

ROOT = Path(__file__).resolve().parent.parent
BIN = ROOT / ".venv" / "bin"
EXPERTMESH = str(BIN / "expertmesh")
PYTHON = str(BIN / "python")


def zoo() -> Path:
    return expertmesh_home() / "zoo" / "pcb-aoi"  # where `make run` and `expertmesh` keep the default zoo


def run(cmd: list[str], *, cwd: Path = ROOT, env: dict | None = None, stamp_lines: bool = False) -> tuple[str, list[float]]:
    """Run a command, echoing its output; return the output and (stamp_lines) each line's seconds since the start."""
    print(f"$ {' '.join(cmd)}", flush=True)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, stamps = [], []
    for line in proc.stdout:
        sys.stdout.write(line)
        lines.append(line)
        stamps.append(time.monotonic() - t0)
    if proc.wait() != 0:
        raise SystemExit(f"figures: `{' '.join(cmd)}` exited {proc.returncode}; nothing written for this group")
    return "".join(lines), stamps if stamp_lines else []


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine()) if Path("/proc/cpuinfo").is_file() else platform.machine()
    return f"{cpu}, {os.cpu_count()} cpus, {platform.system()} {platform.release()}"


def write(group: str, command: str, data: dict, note: str = "", measured: dict | None = None) -> None:
    """docs/figures/<group>.json; `measured` overrides the provenance fields (commit, date, ...) taken from here now."""
    record = {"figure": group, "commit": git("rev-parse", "HEAD"),
              "worktree_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "command": command,
              "machine": machine(), "load_average_1_5_15m": [round(x, 2) for x in os.getloadavg()],
              "provenance": "measured", "note": note, "data": data}
    record.update(measured or {})
    path = ROOT / blocks.FIGURES_DIR / f"{group}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(f"figures: wrote {path.relative_to(ROOT)}", flush=True)


# ------------------------------------------------------------------------------------------ one function per group
def refresh_accuracy() -> None:
    # the comparison needs both baselines; `make run` / `make zoo` build none, a plain `zoo build` only the active one
    run([EXPERTMESH, "zoo", "build", "--baselines", "all", "--no-progress"])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        run([EXPERTMESH, "zoo", "report", "--no-progress", "--json", str(out)])
        write("accuracy", "expertmesh zoo report", json.loads(out.read_text()))


def refresh_profile() -> None:
    store_path = zoo() / "profile.json"
    text, _ = run([EXPERTMESH, "profile", "--force", "--no-progress", "--out", str(store_path),
                   "--plot", str(ROOT / "docs" / "profile-pcb-aoi.png")])
    table, rows = parse.profile_table(text)
    store = json.loads(store_path.read_text())
    spec_text, _ = run([EXPERTMESH, "spec", "check", "--skip-checkpoints"])
    spec_usage = {name: float(p) for name, p in (ln.split() for ln in spec_text.split("usage probability per request:")[1]
                                                 .splitlines() if ln.strip())}
    cpu = next(iter(store["entries"].values()))["device_name"].replace(" (", ", ").rstrip(")")  # "AMD EPYC ..., 2 cpus"
    write("profile", "expertmesh profile --force", {
        "cpu": cpu, **parse.profile_timings(text), "table_text": table, "rows": rows, "usage": store["usage"],
        "spec_usage": spec_usage}, note="the plot docs/profile-pcb-aoi.png is written by the same run")


# a node lost: two nodes whose memory cannot hold every expert. The default CoE's weights are tiny beside a batch's
# activations, so the profile is taken at a batch of 2 (as the node-loss test's short cluster does)
PLAN_SHORT = {"nodes": 2, "node_memory_gb": 0.005, "profile_max_batch": 2}


def refresh_plan() -> None:
    base = [EXPERTMESH, "plan", "--rps", "20"]
    with tempfile.TemporaryDirectory() as tmp:
        text, _ = run(base + ["--nodes", "3", "--node-memory-gb", "0.06", "--explain", "--json",
                              str(Path(tmp) / "plan.json")])
        plan_json = json.loads((Path(tmp) / "plan.json").read_text())
        small = str(Path(tmp) / "profile-batch2.json")
        run([EXPERTMESH, "profile", "--out", small, "--runs", "3", "--max-batch", str(PLAN_SHORT["profile_max_batch"]),
             "--usage", "spec", "--no-progress", "--plot", str(Path(tmp) / "p.png")])
        short_args = ["--nodes", str(PLAN_SHORT["nodes"]), "--node-memory-gb", str(PLAN_SHORT["node_memory_gb"]),
                      "--profile", small]
        short_text, _ = run(base + short_args + ["--explain", "--json", str(Path(tmp) / "short.json")])
        short_json = json.loads((Path(tmp) / "short.json").read_text())
        tight = {m: parse.plan_header(run(base + short_args + ["--method", m])[0]) for m in ("exact", "heuristic")}
    write("plan", "expertmesh plan --nodes 3 --node-memory-gb 0.06 --rps 20 --explain", {
        "num_nodes": 3, "node_memory_gb": 0.06, "rps": 20, "printout": parse.plan_printout(text), "plan": plan_json,
        "tight": {**PLAN_SHORT, **tight, "printout": parse.plan_printout(short_text),
                  "offloaded": short_json.get("offloaded", {}), "executors": short_json.get("executors", {})}},
        note=f"tight: expertmesh profile --max-batch {PLAN_SHORT['profile_max_batch']} --runs 3 --usage spec --out P, then "
             f"expertmesh plan --nodes {PLAN_SHORT['nodes']} --node-memory-gb {PLAN_SHORT['node_memory_gb']} --profile P "
             "--rps 20 --explain, and --method exact|heuristic")


THROUGHPUT = ROOT / "bench" / "results" / "throughput.json"
THROUGHPUT_BEFORE = "bench/results/throughput-before.json"
THROUGHPUT_COMMAND = f".venv/bin/python -m expertmesh.cli bench throughput --before {THROUGHPUT_BEFORE}"


def refresh_throughput(from_results: bool = False) -> None:
    """Run the bench (it writes bench/results/throughput.json/.md/.png), then record it beside the design before."""
    if not from_results:
        run([PYTHON, "-m", "expertmesh.cli", "bench", "throughput", "--before", THROUGHPUT_BEFORE])
    if not THROUGHPUT.is_file():
        raise SystemExit(f"figures: no {THROUGHPUT.relative_to(ROOT)}; run `{THROUGHPUT_COMMAND}` (or `make figures "
                         "FIGURES=throughput`) first")
    now, before = json.loads(THROUGHPUT.read_text()), json.loads((ROOT / THROUGHPUT_BEFORE).read_text())
    if not now.get("commit"):
        raise SystemExit(f"figures: {THROUGHPUT.relative_to(ROOT)} names no commit; it cannot be quoted")
    m = now.get("machine", {})
    load = m.get("load_average_1_5_15m_at_end") or m.get("load_average_1_5_15m") or []
    write("throughput", now.get("command") or THROUGHPUT_COMMAND, {"before": before, "now": now},
          note=f"the bench's own results: {THROUGHPUT.relative_to(ROOT)} (now) and {THROUGHPUT_BEFORE} (before); "
               "commit, date and load are the run's own (load at its end)",
          measured={"commit": now["commit"], "worktree_dirty": bool(now.get("worktree_dirty")), "date": now["date"],
                    "machine": f"{m.get('platform', '?')}, {m.get('cpu_count', '?')} cpus",
                    "load_average_1_5_15m": [round(x, 2) for x in load]})


def refresh_make_run() -> None:
    text, _ = run(["make", "run"])
    defaults = inspect.signature(run_station).parameters  # the station defaults `expertmesh serve` leaves as they are
    settings = {**parse.serve_settings(text), "board_fraction": defaults["board_fraction"].default,
                "board_size": defaults["board_size"].default}
    write("make_run", "make run", {"settings": settings, "station": parse.station(text), "ready_s": parse.ready_s(text),
                                   "hit_rates": parse.hit_rates(text)},
          note="board_fraction and board_size are run_station's defaults, which `expertmesh serve` uses")


NODE_LOSS_TEST = "tests/test_local_cluster.py::test_a_plan_puts_replicas_on_the_planned_nodes"
NODE_LOSS_COMMAND = f"python -m pytest -s {NODE_LOSS_TEST}"
# the test's clusters (CLUSTERS in tests/test_local_cluster.py): make run's own, and one whose memory is short after
# the loss; each is a test id of its own
NODE_LOSS_CLUSTERS = {"make_run": {"node_memory_gb": 0.06, "profile_max_batch": None},
                      "memory_short": {"node_memory_gb": 0.005, "profile_max_batch": 2}}
# the test's station under the loss (station_outcomes in tests/test_local_cluster.py): not printed, so stated here
NODE_LOSS_STATION = {"rate_per_s": 4, "duration_s": 45, "board_every": 10, "client_timeout_s": 90}


def _before_pooled_hosts(old: dict) -> dict | None:
    """The previous file's figures of the per-expert deployments (before issue 12), kept for the comparison: taken
    from a file in the old layout (data.runs), carried over from one in the new."""
    d = old.get("data", {})
    if "before_pooled_hosts" in d:
        return d["before_pooled_hosts"]
    if "runs" not in d:
        return None
    st = d.get("station", {})
    return {"running_after_s": {"latest": d["runs"]["latest_s"], "min": d["runs"]["min_s"], "max": d["runs"]["max_s"],
                                "num_runs": d["runs"]["num_runs"]},
            "station": {"num_sent": st.get("num_sent"), "num_ok": st.get("num_ok"),
                        "errors_by_code": st.get("errors_by_code", {})},
            "commit": old.get("commit"), "provenance": old.get("provenance"), "command": old.get("command")}


def refresh_node_loss(from_log: Path | None = None, commit: str | None = None) -> None:
    """Run the 3-node test on each of its clusters (or read a saved `pytest -s` log of both) and record what it printed
    about the node loss."""
    texts = {}
    for cluster in NODE_LOSS_CLUSTERS:
        if from_log is None:
            texts[cluster], _ = run([PYTHON, "-m", "pytest", "-s", "-p", "no:cacheprovider",
                                     f"{NODE_LOSS_TEST}[{cluster}]"])
        else:
            parts = from_log.read_text().split(f"[{cluster}]")
            texts[cluster] = parts[1] if len(parts) > 1 else ""
        summary = parse.pytest_summary(texts[cluster])
        if summary["counts"].get("passed", 0) < 1 or summary["counts"].get("failed", 0) or summary["counts"].get("errors", 0):
            raise SystemExit(f"figures: the node-loss test [{cluster}] did not pass ({summary['summary']}); nothing "
                             "written for node_loss")
    old = blocks.load_results(ROOT).get("node_loss", {})
    clusters = {c: {**NODE_LOSS_CLUSTERS[c], **(f := parse.node_loss_test(t)), "station": {**NODE_LOSS_STATION,
                                                                                         **f["station"]}}
                for c, t in texts.items()}
    data = {"clusters": clusters, "before_pooled_hosts": _before_pooled_hosts(old)}
    note = ("per cluster (make_run: 3 x 0.06 GiB, the profile as make run takes it; memory_short: 3 x 0.005 GiB with a "
            "batch of 2, so two nodes cannot hold every expert): station: the test's station_outcomes (4 requests/s for "
            "45 s, every 10th a board, a 90 s client deadline); recovery: per lost expert, seconds from the loss to the "
            "first OK answer of a request sent after it that used the expert (null when none did); "
            "before_pooled_hosts: the per-expert deployments' figures, carried over from the previous file")
    measured = None
    if from_log is not None:
        sha = git("rev-parse", "--verify", f"{commit or 'HEAD'}^{{commit}}")
        date = dt.datetime.fromtimestamp(from_log.stat().st_mtime, dt.timezone.utc).isoformat(timespec="seconds")
        measured = {"commit": sha, "worktree_dirty": None, "date": date, "load_average_1_5_15m": None}
        note += (f"; read from a saved log ({from_log.name}; date: when it was last written): commit "
                 f"{'given with --commit' if commit else 'HEAD when it was recorded'}, the work tree's state and the "
                 "load while it ran not known")
    write("node_loss", NODE_LOSS_COMMAND, data, note=note, measured=measured)


def refresh_ci() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "expertmesh"
        run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(clone)])
        cloned = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True,
                                check=True).stdout.strip()  # what was measured, whatever lands on main meanwhile
        # a clean clone builds its own zoo, as CI does on a fresh machine (no cached zoo under ~/.cache)
        env = {**{k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "RAY_ADDRESS")},
               "EXPERTMESH_HOME": str(Path(tmp) / "home"), "CI": "true"}
        text, stamps = run(["bash", ".ci/run"], cwd=clone, env=env, stamp_lines=True)
    lines = text.splitlines(keepends=True)

    def first(marker: str) -> float:
        at = next((t for ln, t in zip(lines, stamps) if marker in ln), None)
        if at is None:
            raise SystemExit(f"figures: no line with {marker!r} in .ci/run's output (did the Makefile's test recipe change?)")
        return at
    zoo_at, tests_at, end = first("zoo build --no-baseline"), first("-m pytest"), stamps[-1]
    summary = parse.pytest_summary(text)
    write("ci", "bash .ci/run (on a clean clone)", {
        "total_min": end / 60, "install_min": zoo_at / 60, "zoo_min": (tests_at - zoo_at) / 60,
        "tests_min": (end - tests_at) / 60, "pytest": summary},
        note="phases split where make echoes the zoo build and the pytest command; times are when output lines arrived",
        measured={"commit": cloned, "worktree_dirty": False})


TRAINING_COMMAND = "expertmesh zoo build --zoo <a fresh empty directory> --baselines none --no-progress"


def refresh_training() -> None:
    """Time `make run`'s training (the default spec's experts, no baselines) into a fresh, empty zoo, so every expert
    and the images are made from scratch; the zoo is deleted afterwards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # each line when printed: the stamps split the phases
    with tempfile.TemporaryDirectory(prefix="expertmesh-training-") as tmp:
        t0 = time.monotonic()
        text, stamps = run([EXPERTMESH, "zoo", "build", "--zoo", str(Path(tmp) / "zoo"), "--baselines", "none",
                            "--no-progress"], env=env, stamp_lines=True)
        wall_s = time.monotonic() - t0
    build = parse.zoo_build(text)
    if build["num_up_to_date"] or not build["num_trained"]:
        raise SystemExit(f"figures: the fresh zoo skipped {build['num_up_to_date']} up-to-date model(s) and trained "
                         f"{build['num_trained']}; nothing written for training")
    lines = text.splitlines()

    def at(prefix: str) -> float:
        return next(t for ln, t in zip(lines, stamps) if ln.startswith(prefix))
    first = next(iter(build["models"]))
    models_s = sum(m["train_s"] for m in build["models"].values())
    # from the `training N model(s)` line to the first model's line, less its training: the images (and its arrays)
    images_s = at(f"[1/{build['num_trained']}] {first}:") - at("training ") - build["models"][first]["train_s"]
    write("training", TRAINING_COMMAND, {
        "wall_s": wall_s, "build_s": build["build_s"], "startup_s": wall_s - build["build_s"], "images_s": images_s,
        "models_train_s": models_s, "other_s": build["build_s"] - images_s - models_s,
        "num_models": build["num_trained"], "models": build["models"], "cpu_count": os.cpu_count(),
        "baselines": "none"},
        note="wall_s: the whole command, imports included; build_s: what it printed (`zoo build done in S s`); "
             "startup_s: wall_s - build_s (imports, spec); images_s: from the `training N model(s)` line to the first "
             "model's line, less that model's training; models: each model's training seconds as printed; other_s: "
             "build_s less images and training (the training arrays, validation splits, saving)")


KUBERAY_TEST = "tests/test_kuberay_placement.py"


def refresh_kuberay() -> None:
    """Run the KubeRay-style test and record the timings it prints."""
    text, _ = run([PYTHON, "-m", "pytest", "-s", "-p", "no:cacheprovider", KUBERAY_TEST])
    summary = parse.pytest_summary(text)
    if summary["counts"].get("passed", 0) < 1 or summary["counts"].get("failed", 0) or summary["counts"].get("errors", 0):
        raise SystemExit(f"figures: the KubeRay placement test did not pass ({summary['summary']}); nothing written")
    write("kuberay", f"pytest -s {KUBERAY_TEST}", parse.kuberay_test(text),
          note="seconds on this machine: from submitting serveConfigV2 to the first placement running; from killing "
               "a worker to the re-planned placement running; from re-submitting the same config to the app running "
               "with the same hosts on the same nodes")


REFRESH: dict[str, Callable[[], None]] = {
    "accuracy": refresh_accuracy, "profile": refresh_profile, "plan": refresh_plan,
    "throughput": refresh_throughput, "make_run": refresh_make_run, "node_loss": refresh_node_loss,
    "kuberay": refresh_kuberay, "ci": refresh_ci, "training": refresh_training}


def render() -> None:
    results = blocks.load_results(ROOT)
    for doc in blocks.documents(ROOT):
        text = doc.read_text()
        rendered = blocks.render_readme(text, results)
        if rendered != text:
            doc.write_text(rendered)
    for group in results:
        (ROOT / blocks.FIGURES_DIR / f"{group}.md").write_text(blocks.group_markdown(group, results))
    print(f"figures: the blocks of README.md and docs/*.md, and {blocks.FIGURES_DIR}/*.md, rendered from "
          f"{len(results)} files")


def check() -> int:
    readme, results = blocks.all_documents_text(ROOT), blocks.load_results(ROOT)
    for group in blocks.unmeasured_groups(readme, results):
        print(f"figures: {group} is not measured yet (no {blocks.FIGURES_DIR}/{group}.json, no README block); "
              f"`make figures FIGURES={group}` measures it")
    problems = blocks.stale_blocks(readme, results)
    print("\n".join(problems) or "figures: every README block matches its file")
    return 1 if problems else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("refresh", help="measure the given groups (default all), then render")
    ref.add_argument("groups", nargs="*", default=["all"], help=f"all or any of: {', '.join(REFRESH)}")
    ref.add_argument("--from-results", action="store_true",
                     help="throughput only: record the existing bench/results/throughput.json, do not re-run the bench")
    ref.add_argument("--from-log", type=Path, metavar="FILE",
                     help=f"node_loss only: record a saved `{NODE_LOSS_COMMAND}` output, do not re-run the test")
    ref.add_argument("--commit", help="with --from-log: the commit the log was measured at (default: HEAD)")
    sub.add_parser("render", help="rewrite the README's figure blocks from docs/figures")
    sub.add_parser("check", help="exit 1 when the README and docs/figures disagree")
    a = ap.parse_args()
    if a.command == "check":
        return check()
    if a.command == "refresh":
        groups = list(REFRESH) if a.groups in (["all"], []) else a.groups
        unknown = [g for g in groups if g not in REFRESH]
        if unknown:
            ap.error(f"unknown group(s) {', '.join(unknown)}; use all or any of: {', '.join(REFRESH)}")
        if a.from_results and groups != ["throughput"]:
            ap.error("--from-results records an existing bench run: use it with the throughput group alone")
        if a.from_log and groups != ["node_loss"]:
            ap.error("--from-log records a saved run of the node-loss test: use it with the node_loss group alone")
        if a.commit and not a.from_log:
            ap.error("--commit names the commit a saved log was measured at: use it with --from-log")
        if a.from_log and not a.from_log.is_file():
            ap.error(f"--from-log {a.from_log}: no such file")
        for g in groups:
            REFRESH[g](**({"from_results": True} if a.from_results else
                          {"from_log": a.from_log, "commit": a.commit} if a.from_log else {}))
    render()
    return 0


if __name__ == "__main__":
    sys.exit(main())
