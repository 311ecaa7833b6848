"""Figures read back from what ExpertMesh's commands print (pure: text in, plain data out).

Each parser names the line it expected when the text lacks it, so a changed output format fails `make figures`
loudly instead of writing a wrong figure.
"""

from __future__ import annotations

import ast
import json
import re


class FigureParseError(ValueError):
    pass


def _search(pattern: str, text: str, what: str, flags: int = 0) -> re.Match:
    m = re.search(pattern, text, flags)
    if m is None:
        raise FigureParseError(f"no {what} in the command's output (expected a line matching {pattern!r})")
    return m


def station(text: str) -> dict:
    """`expertmesh station` / `serve --station-seconds`: the report StationReport.format prints."""
    head = _search(r"station -> (\S+): (\d+) requests in ([\d.]+) s, (\d+) components answered \(([\d.]+) components/s\)",
                   text, "station summary")
    lat = _search(r"latency p50 ([\d.]+) ms, p99 ([\d.]+) ms; verdict accuracy ([\d.]+)", text, "station latency line")
    errs = _search(r"errors by code: (.*)", text, "station errors line")[1].strip()
    hits = _search(r"expert hits: (.*)", text, "station expert hits line")[1].strip()

    def counts(s: str) -> dict[str, int]:
        return {} if s in ("", "none") else {k: int(v) for k, v in (part.rsplit(" ", 1) for part in s.split(", "))}
    return {"target": head[1], "num_sent": int(head[2]), "duration_s": float(head[3]), "num_components": int(head[4]),
            "throughput_per_s": float(head[5]), "p50_ms": float(lat[1]), "p99_ms": float(lat[2]),
            "verdict_accuracy": float(lat[3]), "errors_by_code": counts(errs), "experts_hit": counts(hits)}


def hit_rates(text: str) -> dict[str, float]:
    """`expertmesh serve`'s hit rates after a station run (from Prometheus)."""
    block = _search(r"expert hit rate \(Prometheus, since start\):\n((?:  \S+ +[\d.]+\n?)+)", text, "hit-rate table")
    return {name: float(v) for name, v in (line.split() for line in block[1].splitlines() if line.strip())}


def ready_s(text: str) -> float:
    """Seconds from `expertmesh serve` starting to the app serving."""
    return float(_search(r"serving after ([\d.]+) s", text, "'serving after N s' line")[1])


def serve_settings(text: str) -> dict:
    """The station and residency settings `make run` passed to `expertmesh serve` (make echoes the command)."""
    cmd = _search(r"expertmesh serve .*--station-seconds.*", text, "echoed `expertmesh serve` command")[0]

    def flag(name: str) -> float:
        return float(_search(rf"--{name} (\S+)", cmd, f"--{name} in the serve command")[1])
    return {"station_seconds": flag("station-seconds"), "station_rate": flag("station-rate"),
            "device_idle_s": flag("device-idle-s"), "host_idle_s": flag("host-idle-s")}


def plan_header(text: str) -> dict:
    """The first line of `expertmesh plan`: method, cut and total dependent calls/s, share inside a node."""
    m = _search(r"plan \((\w+)\): cut (\S+) of (\S+) dependent calls/s - ([\d.]+)% stay inside a node", text, "plan header")
    return {"method": m[1], "cut": m[2], "total": m[3], "internal_pct": m[4]}


def plan_printout(text: str) -> str:
    """`expertmesh plan --explain`'s plan, without the note of where the JSON went."""
    lines = [ln for ln in text.splitlines() if not ln.startswith("plan JSON:")]
    start = next((i for i, ln in enumerate(lines) if " plan (" in ln), None)
    if start is None:
        raise FigureParseError("no plan header in `expertmesh plan`'s output")
    return "\n".join(lines[start:]).rstrip()


PROFILE_COLUMNS = ("expert", "device", "k_ms_per_img", "b_ms", "r2", "best_n", "ms_per_img_at_n", "weights_kib",
                   "peak_mib", "disk_host_ms", "host_dev_ms")


def profile_table(text: str) -> tuple[str, list[dict]]:
    """`expertmesh profile`'s table (format_profiles): its text from the header to the dependency weights, and rows."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("expert ") and "K ms/img" in ln), None)
    end = next((i for i, ln in enumerate(lines) if ln.startswith("dependency weights")), None)
    if start is None or end is None:
        raise FigureParseError("no profile table (a header with 'K ms/img' through 'dependency weights') in the output")
    rows = []
    for ln in lines[start + 2:]:
        if not ln.strip():
            break
        cells = ln.split()
        if len(cells) != len(PROFILE_COLUMNS):
            raise FigureParseError(f"profile row with {len(cells)} cells, expected {len(PROFILE_COLUMNS)}: {ln!r}")
        rows.append({k: (v if k in ("expert", "device") else int(v) if k == "best_n" else float(v))
                     for k, v in zip(PROFILE_COLUMNS, cells)})
    return "\n".join(lines[start:end + 1]), rows


def profile_timings(text: str) -> dict:
    """`expertmesh profile`: seconds for the experts and in all."""
    experts = _search(r"profiled (\d+) expert\(s\) in ([\d.]+) s", text, "'profiled N expert(s) in S s' line "
                      "(were all entries current? refresh measures with --force)")
    took = _search(r"^took ([\d.]+) s", text, "'took S s' line", re.M)
    return {"num_profiled": int(experts[1]), "experts_s": float(experts[2]), "took_s": float(took[1])}


def pytest_summary(text: str) -> dict:
    """pytest's last summary line: counts by outcome, the total and the seconds."""
    m = None  # `=== 1 passed in 3.2s ===`, or under -q the bare `1 passed, 2 deselected in 459.31s (0:07:39)`
    for m in re.finditer(r"^(?:=+ (.*?)|(\d+ (?:passed|failed|errors?|skipped|deselected|xfailed|xpassed|warnings?)\b.*?))"
                         r" in ([\d.]+)s(?: \([\d:]+\))?(?(1) =+)$", text, re.M):
        pass
    if m is None:
        raise FigureParseError("no pytest summary line ('=== N passed, ... in S s ===') in the output")
    line = m[1] or m[2]
    counts = {outcome: int(n) for n, outcome in re.findall(r"(\d+) (\w+)", line)}
    counts = {("errors" if k == "error" else k): v for k, v in counts.items()}
    return {"summary": line, "counts": counts, "seconds": float(m[3]),
            "num_tests": sum(v for k, v in counts.items() if k in ("passed", "failed", "skipped", "xfailed", "xpassed"))}


def _placement(tail: str) -> dict[str, list[str]]:
    """`expert@node+node, ...` (the end of the controller's re-plan log line) as expert -> nodes."""
    try:
        return {e: ns.split("+") for e, ns in (item.strip().split("@") for item in tail.split(", "))}
    except ValueError:
        raise FigureParseError(f"no placement ('expert@node+node, ...') at the end of the re-plan log line: {tail!r}")


def node_loss_test(text: str) -> dict:
    """`pytest -s` of the 3-node test: co-location before the loss, the first re-plan after it (timings, what moved
    where), how soon the lost experts answered again (None when no request after the loss needed one), and the
    station under the loss (its codes and the requests past 30 s)."""
    co = _search(r"co-location: (\d+)/(\d+) inspections of (\d+) requests ran their plan on one node \(plan cut (\S+)\)",
                 text, "co-location line")
    applied = _search(r"\[placement\] re-planned and applied in ([\d.]+) s \((.*?); planned in ([\d.]+) s\): moved (.*?); "
                      r"(?:memory short, off the device: (.*?); )?cut (\S+) of (\S+) calls/s; (.*)", text,
                      "'[placement] re-planned and applied' log line")
    loss = _search(r"node (\S+) removed: re-planning began (-?[\d.]+) s after, the new placement was running ([\d.]+) s "
                   r"after \(([\d.]+) s to plan and apply, ([\d.]+) s to plan\)", text, "node-loss timing line")
    recovered = re.search(r"lost experts answering again after ([\d.]+) s: (.*)", text)
    past = _search(r"requests past 30 s \(the station's deadline in the issue\): (\d+)", text, "'requests past 30 s' line")
    st = _search(r"station during the loss: (\d+) requests, (\{.*\})", text, "'station during the loss' line")
    try:
        codes = ast.literal_eval(st[2])
    except (ValueError, SyntaxError):
        codes = None
    if not isinstance(codes, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in codes.items()):
        raise FigureParseError(f"the station's codes are not a dict of code -> count: {st[2]!r}")
    placement = _placement(applied[8])
    moved = [] if applied[4] == "nothing" else applied[4].split(", ")
    offloaded = applied[5].split(", ") if applied[5] else []
    by_expert = ({e: float(s) for e, s in (part.rsplit(" ", 1) for part in recovered[2].removesuffix(" s").split(" s, "))}
                 if recovered else {})
    return {
        "victim": loss[1],
        "colocation": {"one_node": int(co[1]), "inspections": int(co[2]), "requests": int(co[3]), "plan_cut": co[4]},
        "replan": {"reason": applied[2], "began_s": float(loss[2]), "running_after_s": float(loss[3]),
                   "plan_apply_s": float(loss[4]), "plan_s": float(loss[5])},
        "moved": moved, "moved_to": {e: placement.get(e, []) for e in moved}, "off_the_device": offloaded,
        "cut_after": applied[6], "total_weight": applied[7], "placement_after": placement,
        "recovery": {"max_s": float(recovered[1]), "by_expert_s": by_expert} if recovered else None,
        "requests_past_30_s": int(past[1]),
        "station": {"num_sent": int(st[1]), "codes": codes},
    }


def kuberay_test(text: str) -> dict:
    """`pytest -s` of tests/test_kuberay_placement.py: the JSON of its 'kuberay placement figures:' line."""
    line = _search(r"kuberay placement figures: (\{.*\})", text, "'kuberay placement figures' line")
    return json.loads(line[1])


ZOO_TRAINED_RE = re.compile(r"^\[(\d+)/(\d+)\] (\S+): (\d+) images x (\d+) epochs in ([\d.]+) s", re.M)


def zoo_build(text: str) -> dict:
    """`expertmesh zoo build`: the build's own seconds, what it trained and skipped, and per model its images, epochs
    and training seconds (the `[i/N] name: X images x E epochs in S s, ...` lines)."""
    done = _search(r"^zoo build done in ([\d.]+) s: (\d+) trained, (\d+) up to date", text,
                   "'zoo build done in S s: N trained, M up to date' line", re.M)
    models = {m[3]: {"num_images": int(m[4]), "epochs": int(m[5]), "train_s": float(m[6])}
              for m in ZOO_TRAINED_RE.finditer(text)}
    if len(models) != int(done[2]):
        raise FigureParseError(f"the build says {done[2]} trained but prints {len(models)} '[i/N] name: X images x E "
                               "epochs in S s' lines")
    return {"build_s": float(done[1]), "num_trained": int(done[2]), "num_up_to_date": int(done[3]), "models": models}
