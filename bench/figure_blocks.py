"""The figure blocks of README.md and docs/*.md, rendered from the results files under docs/figures/ (pure: no Ray,
no torch). Their links start at the repository's root (`/docs/figures/...`), so a block reads the same on any page.

A block is README text between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`; NAME is `<group>` or
`<group>.<part>`, and the group names the results file `docs/figures/<group>.json` it is rendered from. A block whose
markers sit on lines of their own is a passage (its text starts and ends with a newline); one inside a line is a
phrase. `render_readme` rewrites every block from the files; `stale_blocks` lists the blocks that disagree with them
(what tests/test_readme_figures.py and `python bench/figures.py check` fail on).
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Callable
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

from expertmesh.bench.throughput_table import headline_rows
from expertmesh.experts.accuracy_tables import accuracy_tables

FIGURES_DIR = Path("docs/figures")
BLOCK_RE = re.compile(r"<!-- figures:(?P<name>[a-z_.]+) -->(?P<body>.*?)<!-- /figures:(?P=name) -->", re.S)


def num(x: float, digits: int) -> str:
    """x rounded half up to `digits` decimals (the way a reader rounds 0.75 -> 0.8, whatever the float's last bit)."""
    q = Decimal(1).scaleb(-digits)
    return str(Decimal(repr(round(float(x), 9))).quantize(q, rounding=ROUND_HALF_UP))


def wrap(text: str, indent: str = "") -> str:
    """Prose wrapped the way the README is (118 columns), never inside a word or at a hyphen."""
    return textwrap.fill(" ".join(text.split()), width=118, initial_indent=indent, subsequent_indent=" " * len(indent),
                         break_long_words=False, break_on_hyphens=False)


def bullet(text: str) -> str:
    """A README list item of wrapped prose (continuation lines indented under its text), as a block's own lines."""
    return "\n" + wrap(f"- {text}", indent="  ")[2:] + "\n"


def span(lo: float, hi: float, digits: int = 0) -> str:
    return num(lo, digits) if num(lo, digits) == num(hi, digits) else f"{num(lo, digits)}-{num(hi, digits)}"


def and_list(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def source_note(group: str, results: dict) -> str:
    """How a file's figures were made: the command and commit, or where they were transcribed from."""
    r = results[group]
    made = f"`{r['command']}` at {r['commit'][:7]}, {r['date'][:10]}"
    if r["provenance"] == "transcribed":
        made = f"transcribed from the README at {r['commit'][:7]}, {r['date'][:10]}, measured then by `{r['command']}`"
    load = r.get("load_average_1_5_15m")
    if load and load[1] > 2.5:
        made += f", on a shared machine (load average {load[1]:g} over 5 min)"
    return f"[`{FIGURES_DIR}/{group}.json`](/{FIGURES_DIR}/{group}.json): {made}; `make figures` refreshes it"


# ---------------------------------------------------------------------------------------------------- make run
def make_run_station(results: dict) -> str:
    d = results["make_run"]["data"]
    s, run = d["station"], d["settings"]
    errors = ", ".join(f"{k} {v}" for k, v in sorted(s["errors_by_code"].items())) or "no errors"
    return bullet(f"`make run`'s station ({num(run['station_seconds'], 0)} s, {num(run['station_rate'], 0)} requests/s, "
                  f"{num(100 * run['board_fraction'], 0)}% boards of {run['board_size']}): {s['num_sent']} requests, "
                  f"{s['num_components']} components ({num(s['throughput_per_s'], 1)}/s), p50 {num(s['p50_ms'], 1)} ms, "
                  f"p99 {num(s['p99_ms'], 1)} ms, verdict accuracy {num(s['verdict_accuracy'], 3)}, {errors}; the app was "
                  f"ready {num(d['ready_s'], 1)} s after `expertmesh serve` started ({source_note('make_run', results)}).")


def make_run_hit_rates(results: dict) -> str:
    d = results["make_run"]["data"]
    run, hits = d["settings"], d["station"]["experts_hit"]
    by_value: dict[str, list[str]] = {}
    for expert, rate in sorted(d["hit_rates"].items(), key=lambda kv: (-kv[1], kv[0])):
        by_value.setdefault(num(rate, 3), []).append(expert)
    parts = []
    for value, experts in by_value.items():
        if float(value) == 0:
            parts += [f"{e} {value} ({hits.get(e, 0)} call{'s' * (hits.get(e, 0) != 1)}, "
                      f"{'which' if hits.get(e, 0) == 1 else 'all of which'} waited for a load)" for e in experts]
        else:
            parts.append(f"{and_list(experts)} {value}")
    return "\n" + wrap(
        f"After `make run`'s {num(run['station_seconds'], 0)} s station (residency {num(run['device_idle_s'], 0)} s / "
        f"{num(run['host_idle_s'], 0)} s), Prometheus showed these hit rates: {'; '.join(parts)}. Rare experts pay a "
        f"load on almost every call; at {num(d['station']['throughput_per_s'], 0)} components/s the common ones stay "
        f"resident ({source_note('make_run', results)}).") + "\n"


# ---------------------------------------------------------------------------------------------------- accuracy
WEAK_EXPERT_WHY = {"qfp_defect": "bridges between fine-pitch leads are a few pixels",
                   "general_defect": "one small 64 px model for every part, reached only when the router is unsure",
                   "solder_fine": "its share of QFP images is too small for fine-pitch bridges; QFPs reach it only "
                                  "through the `wave_solder_line` rule",
                   "diode_defect": "diodes and LEDs share each label's images"}


BASELINE_WHAT = {"monolithic": "active parameters per image", "monolithic_total": "total parameters"}


def accuracy(results: dict) -> str:
    report = results["accuracy"]["data"]
    coe = report["coe"]
    intro = wrap(f"Measured on this machine (2 cores, no GPU) by `expertmesh zoo report` after `expertmesh zoo build "
                 f"--baselines all` (`make run` reports the same but for mono (total), which it does not build; "
                 f"{source_note('accuracy', results)}):")
    prose = ""
    for key, what in BASELINE_WHAT.items():
        mono = report.get(key)
        if not mono:
            continue
        points = round(coe["verdict_accuracy"], 4) * 100 - round(mono["verdict_accuracy"], 4) * 100
        recall = (f", defect recall {num(coe['defect_recall'], 3)} against {num(mono['defect_recall'], 3)}"
                  if coe.get("defect_recall") is not None and mono.get("defect_recall") is not None else "")
        prose += (f"Against the monolithic baseline of the same {what} ({mono['total_parameters']:,} parameters) the "
                  f"CoE is {'ahead' if points >= 0 else 'behind'} by {num(abs(points), 1)} points of verdict accuracy"
                  f"{recall}. ")
    if prose:
        prose += (f"The CoE runs {coe['mean_experts_per_image']:.2f} small models per image (router included) and "
                  f"holds {coe['total_parameters']:,} parameters in all. ")
    order = [e["expert"] for e in report["experts"]]
    weakest = sorted(sorted(report["experts"], key=lambda e: e["accuracy"])[:2], key=lambda e: order.index(e["expert"]))
    named = [f"`{e['expert']}` ({num(e['accuracy'], 2)}" + (f": {WEAK_EXPERT_WHY[e['expert']]})" if e["expert"] in
             WEAK_EXPERT_WHY else ")") for e in weakest]
    prose += f"The weakest parts are {and_list(named)}."
    return f"\n{intro}\n\n```\n{accuracy_tables(report)}\n```\n\n{wrap(prose)}\n"


# ---------------------------------------------------------------------------------------------------- profile
def profile_intro(results: dict) -> str:
    d = results["profile"]["data"]
    return "\n" + wrap(
        f"The default CoE, profiled on this machine ({d['cpu']}, no GPU; `make profile`, i.e. "
        f"`expertmesh profile`, took {num(d['took_s'], 1)} s in all: {num(d['experts_s'], 1)} s for the "
        f"{len(d['rows'])} experts, the rest the {d['usage']['num_requests']:,}-image usage sample; "
        f"{source_note('profile', results)}):") + "\n"


def profile_table(results: dict) -> str:
    return "\n```\n" + results["profile"]["data"]["table_text"] + "\n```\n"


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def profile_findings(results: dict) -> str:
    d = results["profile"]["data"]
    rows = d["rows"]
    ks, bs = [r["k_ms_per_img"] for r in rows], [r["b_ms"] for r in rows]
    share = _median([r["ms_per_img_at_n"] / (r["k_ms_per_img"] + r["b_ms"]) for r in rows])
    best = [r["best_n"] for r in rows]
    usage, spec_usage = d["usage"]["usage"], d["spec_usage"]
    first, second = sorted((e for e in usage if e in spec_usage), key=lambda e: -abs(usage[e] - spec_usage[e]))[:2]
    return "\n" + wrap(
        f"On the CPU these small models have a fixed cost per batch B of about {num(_median(bs), 1)} ms against "
        f"about {span(min(ks), max(ks), 1)} ms per image, so batching cuts the per-image time to about "
        f"{num(100 * share, 0)}% of a lone image's (K + B; the median over the experts) and stops paying at "
        f"{span(min(best), max(best))} images; loading an expert from disk takes about "
        f"{num(_median([r['disk_host_ms'] for r in rows]), 0)} ms, moving it onto the (CPU) device at most "
        f"{num(max(r['host_dev_ms'] for r in rows), 2)} ms. The sample's usage differs from the spec's expected mix "
        f"where the spec guessed trigger rates: `{first}` is reached by {num(100 * usage[first], 1)}% of requests (the "
        f"spec assumed {num(100 * spec_usage[first], 1)}%), `{second}` by {num(100 * usage[second], 1)}% "
        f"({num(100 * spec_usage[second], 1)}%).") + "\n"


# ---------------------------------------------------------------------------------------------------- plan
def plan(results: dict) -> str:
    return f"\n```\n{results['plan']['data']['printout']}\n```\n"


def plan_tight(results: dict) -> str:
    d = results["plan"]["data"]
    t = d["tight"]
    exact, heur = t["exact"], t["heuristic"]
    off = sorted(e for es in (t.get("offloaded") or {}).values() for e in es)
    said = (f"On {t['nodes']} nodes of {num(t['node_memory_gb'] * 1024, 1)} MiB (a node of such a cluster lost; the profile "
            f"taken at a batch of {t.get('profile_max_batch', '?')}, where weights, not a batch's activations, fill the "
            f"memory) it no longer holds every expert: the plan keeps {and_list(off) if off else 'none'} off the device (in host "
            f"memory or loaded on demand) instead of refusing, and cuts {exact['cut']} of {exact['total']} dependent "
            f"calls/s ({exact['internal_pct']}% stay inside a node; the heuristic finds {heur['cut']}, "
            f"{heur['internal_pct']}%)")
    return "\n" + wrap(f"{said}:") + f"\n\n```\n{t['printout']}\n```\n\n" + wrap(
        f"Both plans: {source_note('plan', results)}.") + "\n"


# ---------------------------------------------------------------------------------------------------- throughput
THROUGHPUT_RESULTS = "bench/results/throughput"  # what `expertmesh bench throughput` writes: .json, .md and .png


def _headline_cells(docs: list[dict]) -> Callable[[str], list[str]]:
    """The bench's own headline rows (bench/throughput_table.py) by label, one cell per document."""
    rows = dict(headline_rows(docs))

    def cells(label: str) -> list[str]:
        if label not in rows:
            raise ValueError(f"bench/throughput_table.py's headline_rows has no row {label!r} any more; update "
                             "figure_blocks.throughput to its rows")
        return rows[label]
    return cells


def _overload_cell(doc: dict, kind: str, share: str) -> str:
    o = (doc.get("overload") or {}).get(kind)
    if not o:
        return "-"
    return (f"{share} of capacity; {o['num_refused']} refused, {o['num_deadline_exceeded']} past deadline of "
            f"{o['num_sent']}")


def throughput(results: dict) -> str:
    """Before (the design before issue 12) and now, side by side, in the bench's own headline figures."""
    d = results["throughput"]["data"]
    docs = [d["before"], d["now"]]
    cell = _headline_cells(docs)

    def joined(fmt: str, *labels: str) -> list[str]:
        return [fmt.format(*parts) for parts in zip(*(cell(label) for label in labels))]

    def overload(kind: str) -> list[str]:
        return [_overload_cell(doc, kind, share)
                for doc, share in zip(docs, cell(f"{kind}: overload throughput, share of capacity"))]
    factor, board_size = num(d["now"]["settings"]["overload_factor"], 0), d["now"]["settings"]["board_size"]
    rows = [
        ("offline bound (one process, batched), components/s",
         cell("offline bound (one process, batched), components/s")),
        ("no-op Serve gRPC app, requests/s: capacity / highest rate with p99 <= 250 ms",
         joined("{} / {}", "no-op Serve gRPC app: capacity, requests/s",
                "no-op: highest rate with p99 <= 250 ms, requests/s")),
        ("single Inspect, components/s: capacity / highest rate with p99 <= 250 ms (share of the no-op's)",
         joined("{} / {} ({})", "single Inspect: capacity, components/s",
                "single: highest rate with p99 <= 250 ms, requests/s", "single: that rate as a share of the no-op's")),
        (f"boards of {board_size}, components/s: capacity / highest rate with board p99 <= 1 s (share of offline "
         "bound)", joined("{} / {}", "boards of 50: capacity, components/s",
                          "boards: that rate in components/s (share of offline bound)")),
        (f"single Inspect at {factor}x capacity: throughput", overload("single")),
        (f"boards at {factor}x capacity: throughput", overload("board")),
        ("deploy to first answer, s", cell("ExpertMesh deploy to first answer, s")),
        ("replicas' RSS after load (processes)",
         joined("{} ({})", "ExpertMesh replicas' RSS after load", "ExpertMesh replica processes (after load)")),
    ]
    table = "\n".join([f"| `expertmesh bench throughput` | before ({docs[0]['commit'][:7]}) | now ({docs[1]['commit'][:7]}) |",
                       "|---|---|---|", *(f"| {label} | {' | '.join(cells)} |" for label, cells in rows)])
    after = wrap(f"`before` is the design before issue 12 ({docs[0]['commit'][:7]}, measured {docs[0]['date'][:10]}, "
                 f"not re-run); every sweep point is in [`{THROUGHPUT_RESULTS}.md`](/{THROUGHPUT_RESULTS}.md), the plot "
                 f"in [`{THROUGHPUT_RESULTS}.png`](/{THROUGHPUT_RESULTS}.png) "
                 f"({source_note('throughput', results)}).")
    return f"\n{table}\n\n{after}\n"


# ---------------------------------------------------------------------------------------------------- node loss
def node_loss_range(results: dict) -> str:
    """Seconds from the node's loss until the re-planned placement was running: make run's cluster, the short one."""
    c = results["node_loss"]["data"]["clusters"]
    return (f"{num(c['make_run']['replan']['running_after_s'], 1)} s (memory short after the loss: "
            f"{num(c['memory_short']['replan']['running_after_s'], 1)} s)")


def node_loss_colocation(results: dict) -> str:
    c = results["node_loss"]["data"]["clusters"]["make_run"]["colocation"]
    return f"{c['one_node']} of {c['inspections']} inspections ({c['requests']} requests)"


def _short(expert: str) -> str:
    return expert.removesuffix("_defect")


def _node_loss_before(before: dict | None) -> str:
    """The per-expert deployments' figures (before issue 12), when the file keeps them."""
    if not before:
        return ""
    runs, st = before["running_after_s"], before["station"]
    errors = sum(st["errors_by_code"].values())
    over = (f" over {runs['num_runs']} runs" if runs["num_runs"] > 1 else "")
    at = f", {before['commit'][:7]}" if before.get("commit") else ""
    return (f" Before issue 12 (one deployment per expert{at}: a lost node's experts needed new replicas, new processes "
            f"importing torch), the new placement was running {span(runs['min'], runs['max'])} s after the loss{over}, "
            f"and {errors} of {st['num_sent']} station requests "
            + ("waited past the 30 s deadline." if set(st["errors_by_code"]) == {"DEADLINE_EXCEEDED"}
               else f"ended in an error ({', '.join(f'{k} {v}' for k, v in sorted(st['errors_by_code'].items()))})."))


def _node_loss_one(d: dict) -> str:
    r, st, rec = d["replan"], d["station"], d["recovery"]
    codes = st["codes"]
    errors = {k: v for k, v in codes.items() if k != "OK"}
    ended = (f"all ended: {codes.get('OK', 0)} answered, "
             + and_list([f"{v} explicit {k}" for k, v in sorted(errors.items())]) if errors else "were all answered")
    if rec:
        slowest = sorted(e for e, s in rec["by_expert_s"].items() if num(s, 1) == num(rec["max_s"], 1))
        recovered = (f"every lost expert a request needed answered again within {num(rec['max_s'], 1)} s of the loss "
                     f"({len(rec['by_expert_s'])} experts, {span(min(rec['by_expert_s'].values()), rec['max_s'], 1)} s, "
                     f"{and_list(slowest)} the last)")
    else:
        recovered = "no request sent after the loss needed one of the lost experts"
    moved_to = sorted({n for ns in d["moved_to"].values() for n in ns} - {d["victim"]})
    moved = (f"moves {len(d['moved'])} experts ({', '.join(_short(e) for e in d['moved'])}) onto the "
             f"host{'s' * (len(moved_to) > 1)} on {and_list(moved_to)} and nothing else" if d["moved"] else "moves nothing")
    off = (f"; memory is short on the survivors, so {and_list([_short(e) for e in d['off_the_device']])} start off the "
           "device (in host memory or on disk)" if d.get("off_the_device") else "")
    return (f"{recovered}; the controller began re-planning {num(max(0.0, r['began_s']), 1)} s after the loss and "
            f"planned in {num(r['plan_s'], 1)} s; the new placement {moved}{off}, cut {d['cut_after']} of "
            f"{d['total_weight']} calls/s, and was running {num(r['running_after_s'], 1)} s after the loss "
            f"({num(r['plan_apply_s'], 1)} s to plan and apply). The station's {st['num_sent']} requests {ended}; "
            f"{d['requests_past_30_s']} took longer than 30 s (the issue's deadline).")


def node_loss(results: dict) -> str:
    c = results["node_loss"]["data"]["clusters"]
    run, short = c["make_run"], c["memory_short"]
    co = run["colocation"]
    return "\n" + wrap(
        f"Measured on this 2-core machine (`tests/test_local_cluster.py::test_a_plan_puts_replicas_on_the_planned_nodes`, "
        f"or by hand: `expertmesh up --nodes 3 --node-memory-gb 0.06`, `expertmesh plan --json plan.json`, `expertmesh "
        f"serve --address local --plan plan.json --replan`, a station at {num(run['station']['rate_per_s'], 0)} "
        f"requests/s for {num(run['station']['duration_s'], 0)} s, then `expertmesh node remove {run['victim']}`). A "
        f"lost node's experts are answered from a surviving expert host as soon as the router sees the node gone: the "
        f"host loads them into its running process, and the re-plan only reconfigures the running hosts, the router and "
        f"the ingress through `user_config` (the same replica actors before and after). On `make run`'s cluster (3 x "
        f"0.06 GiB): {_node_loss_one(run)} Before the loss, {co['one_node']} of {co['inspections']} inspections "
        f"({co['requests']} requests) ran all their expert calls on one node (the plan cuts {co['plan_cut']}). On a "
        f"cluster whose memory cannot hold every expert once a node is gone (3 x {num(short['node_memory_gb'] * 1024, 1)} "
        f"MiB, the profile at a batch of {short['profile_max_batch']}; the planner used to refuse such a re-plan at every "
        f"poll): {_node_loss_one(short)}{_node_loss_before(c.get('before_pooled_hosts') or results['node_loss']['data'].get('before_pooled_hosts'))}"
        f" ({source_note('node_loss', results)}).") + "\n"


# ---------------------------------------------------------------------------------------------------- kuberay
def kuberay(results: dict) -> str:
    d = results["kuberay"]["data"]
    return "\n" + wrap(
        f"Measured on this 2-core machine by that test: the first placement (planned from the "
        f"{d['planned_from']}, on {and_list(d['nodes_used_first'])}) was running {num(d['first_placement_running_s'], 0)} s "
        f"after serveConfigV2 was submitted; after {d['lost_node']} was killed the re-planned placement (on "
        f"{and_list(d['nodes_used_after'])}) was running {num(d['replan_running_s'], 0)} s later, every replica rolled; "
        f"the same config re-submitted was running again, with the same hosts on the same pods, within "
        f"{num(d['resubmitted_running_s'], 0)} s (the test looks 10 s after submitting at the earliest) "
        f"({source_note('kuberay', results)}).") + "\n"


# ---------------------------------------------------------------------------------------------------- CI
def ci(results: dict) -> str:
    d = results["ci"]["data"]

    def minutes(x) -> str:
        return f"about {span(x[0], x[1])}" if isinstance(x, list) else num(x, 1)
    tests = d["pytest"]
    counted = f"{tests['num_tests']} tests" + (f": {tests['summary']}" if tests.get("summary") else "")
    return "\n" + wrap(
        f"CI runs `bash .ci/run` (= `CI=true make test`) on a clean clone: 2 cores, no GPU. Measured on a clean clone "
        f"of this machine (2 cores; {source_note('ci', results)}): {num(d['total_min'], 1)} minutes in all - install "
        f"and Prometheus {minutes(d['install_min'])}, the default zoo without the baseline {minutes(d['zoo_min'])}, the "
        f"tests {minutes(d['tests_min'])} ({counted}; the 3-node cluster test with its node loss and the serving tests "
        f"on one shared Ray/Serve instance take most of it).") + "\n"


# ---------------------------------------------------------------------------------------------------- training
def _slowest(d: dict) -> tuple[str, float]:
    name = max(d["models"], key=lambda m: d["models"][m]["train_s"])
    return name, d["models"][name]["train_s"]


def training(results: dict) -> str:
    d = results["training"]["data"]
    slowest, slowest_s = _slowest(d)
    return bullet(
        f"**Measured:** `make run` trains the {d['num_models']} experts in {num(d['wall_s'], 0)} s on this "
        f"{d['cpu_count']}-core machine (a fresh zoo, images included; the baselines are not built): "
        f"{num(d['models_train_s'], 0)} s training the experts (the slowest `{slowest}`, {num(slowest_s, 0)} s), "
        f"{num(d['images_s'], 0)} s generating the images, {num(d['startup_s'], 0)} s starting up and "
        f"{num(d['other_s'], 0)} s for the rest (the training arrays, saving) ({source_note('training', results)}).")


def training_total(results: dict) -> str:
    return f"{num(results['training']['data']['wall_s'], 0)} s"


def training_split(results: dict) -> str:
    d = results["training"]["data"]
    return (f"{num(d['wall_s'], 0)} s on {d['cpu_count']} cores, measured: the experts {num(d['models_train_s'], 0)} s, "
            f"generating the images {num(d['images_s'], 0)} s")


RENDERERS: dict[str, Callable[[dict], str]] = {
    "make_run.station": make_run_station, "make_run.hit_rates": make_run_hit_rates,
    "accuracy": accuracy,
    "profile.intro": profile_intro, "profile.table": profile_table, "profile.findings": profile_findings,
    "plan": plan, "plan.tight": plan_tight,
    "throughput": throughput,
    "node_loss": node_loss, "node_loss.range": node_loss_range, "node_loss.colocation": node_loss_colocation,
    "kuberay": kuberay, "ci": ci,
    "training": training, "training.total": training_total, "training.split": training_split,
}
GROUPS = sorted({name.split(".")[0] for name in RENDERERS})


def documents(root: Path) -> list[Path]:
    """The texts that quote figures: the README and the pages under docs/ (not docs/figures/, which are renderings)."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def all_documents_text(root: Path) -> str:
    """Every document's text, one after another: the blocks of all of them, each name once (what `check` reads)."""
    return "\n".join(p.read_text() for p in documents(root))


def load_results(root: Path) -> dict[str, dict]:
    """Every group's results file under root/docs/figures, by group."""
    return {g: json.loads((root / FIGURES_DIR / f"{g}.json").read_text()) for g in GROUPS
            if (root / FIGURES_DIR / f"{g}.json").is_file()}


def blocks(readme: str) -> dict[str, str]:
    """The figure blocks of a README text: name -> text between the markers."""
    found: dict[str, str] = {}
    for m in BLOCK_RE.finditer(readme):
        if m["name"] in found:
            raise ValueError(f"README has two blocks named {m['name']!r}; give each its own name")
        found[m["name"]] = m["body"]
    return found


def render_block(name: str, results: dict[str, dict]) -> str:
    if name not in RENDERERS:
        raise ValueError(f"README block {name!r} has no renderer (known: {', '.join(sorted(RENDERERS))}); remove the "
                         "block from README.md, or add its renderer to bench/figure_blocks.py")
    group = name.split(".")[0]
    if group not in results:
        raise ValueError(f"no {FIGURES_DIR}/{group}.json for README block {name!r}; run `make figures FIGURES={group}`")
    return RENDERERS[name](results)


def render_readme(readme: str, results: dict[str, dict]) -> str:
    return BLOCK_RE.sub(lambda m: f"<!-- figures:{m['name']} -->{render_block(m['name'], results)}"
                                  f"<!-- /figures:{m['name']} -->", readme)


def group_markdown(group: str, results: dict[str, dict]) -> str:
    """docs/figures/<group>.md: every block of the group, as the README quotes it."""
    parts = [f"<!-- {name} -->\n{RENDERERS[name](results).strip(chr(10))}\n" for name in RENDERERS
             if name.split(".")[0] == group]
    return f"# Figures: {group}\n\nRendered from `{group}.json` by `python bench/figures.py render`; the README quotes " \
           "these blocks.\n\n" + "\n".join(parts)


def stale_blocks(readme: str, results: dict[str, dict]) -> list[str]:
    """Blocks whose README text differs from their rendering (or that cannot be rendered), and renderers with no README
    block, as messages. A group with no results file yet and no README block is not measured yet: no message."""
    found = blocks(readme)
    problems = []
    for name, body in found.items():
        try:
            rendered = render_block(name, results)
        except ValueError as e:
            problems.append(str(e))
            continue
        if body != rendered:
            problems.append(f"README block {name!r} is not what {FIGURES_DIR}/{name.split('.')[0]}.json renders; run "
                            "`python bench/figures.py render`")
    problems += [f"README has no block {name!r} (<!-- figures:{name} -->...<!-- /figures:{name} -->)"
                 for name in RENDERERS if name not in found and name.split(".")[0] in results]
    return problems


def unmeasured_groups(readme: str, results: dict[str, dict]) -> list[str]:
    """Groups with a renderer but neither a results file nor a README block yet (what `check` notes, not fails on)."""
    quoted = {name.split(".")[0] for name in blocks(readme)}
    return [g for g in GROUPS if g not in results and g not in quoted]
