"""`expertmesh rollout`: change the experts of a running app while stations send traffic (glue over cluster.rollout).

`update SPEC` serves a new revision of the spec (an expert added, removed or given a new checkpoint, a new table or
rules) to every request; `canary SPEC --factory F --share X` to a share of one factory's requests, each of which
also runs on the stable revision so `status` can report how often the two agreed; `promote` makes the canary
stable; `rollback` ends a canary, or returns to the previous stable revision. Each change is applied in the two
steps `cluster.rollout` plans, through Serve's imperative API (`runner.redeploy`): the replicas are reconfigured in
place, none restarts, and no request fails. The state lives in Ray's GCS (`cluster.rollout_store`), beside the
app's build arguments, which `expertmesh serve` stores when it deploys the app. `--coe NAME` changes another CoE the
app serves (`expertmesh serve --coe`) the same way, with a state of its own; `status` lists every CoE's.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import ray
from prometheus_client.parser import text_string_to_metric_families

from expertmesh.cli_options import emit_json
from expertmesh.cluster import rollout, rollout_store
from expertmesh.cluster.prometheus import scrape_targets
from expertmesh.cluster.rollout import RolloutRefused, RolloutState
from expertmesh.deployments import runner
from expertmesh.deployments.auth import TokenTable
from expertmesh.deployments.config import AppArgs
from expertmesh.errors import FailedPrecondition, InvalidArgument
from expertmesh.experts.revisions import revision_label
from expertmesh.experts.spec import load_spec
from expertmesh.metrics import EXPORTED_PREFIX
from expertmesh.serve_command import cluster_address

ACTIONS = ("status", "update", "canary", "promote", "rollback")


def cmd_rollout(args: argparse.Namespace) -> int:
    address = cluster_address(args.address)
    if not address:
        raise InvalidArgument("--address is required", field="--address",
                              fix="pass the Ray address `expertmesh serve` printed (HOST:PORT), or `local` for the "
                                  "cluster `expertmesh up` started")
    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    try:
        app = running_app()
        served = served_files(app)
        coe = target_coe(getattr(args, "coe", "") or "", served)
        if args.action == "status":
            first = next(iter(served))
            states = {name: rollout_store.read("" if name == first else name) for name in served
                      if not args.coe or name == args.coe}  # every CoE's live change, or the one named
            comparisons = read_comparisons()
            if args.json:
                emit_json(args, json.dumps({"coes": {name: state.model_dump() for name, state in states.items()},
                                            "canary_comparisons": [
                                                {"canary": c, "stable": st, "revision": rev, "outcomes": dict(n)}
                                                for (c, st, rev), n in comparisons.items()]}, indent=1))
                return 0
            for name, state in states.items():
                print(describe(state, app, name, served[name]))
            print(format_comparisons(comparisons, states))
            return 0
        state = rollout_store.read(coe)
        steps = plan_steps(args, state, app, coe)
        new = apply(app, steps, log=lambda m: print(m, flush=True), coe=coe)
        name = coe or next(iter(served))
        print(describe(new, app, name, served[name]))
        return 0
    finally:
        ray.shutdown()


def served_files(app: AppArgs) -> dict[str, str | None]:
    """Every CoE the app serves, by spec name -> its spec file (the app's own first; None: the embedded spec)."""
    out: dict[str, str | None] = {load_spec(app.spec).name: app.spec}
    out.update({load_spec(path).name: path for path in app.coes})
    return out


def target_coe(name: str, served: dict[str, str | None]) -> str:
    """The rollout store's key of the CoE a change is for: "" for the app's own (or none named), else its name."""
    if not name or name == next(iter(served)):
        return ""
    if name not in served:
        raise InvalidArgument(f"the app serves no CoE named {name!r}", field="--coe",
                              fix=f"name one of: {', '.join(served)}")
    return name


def running_app() -> AppArgs:
    """The build arguments `expertmesh serve` stored for the running app."""
    stored = rollout_store.read_app_args()
    if stored is None:
        raise FailedPrecondition("no ExpertMesh app deployed by `expertmesh serve` runs on this cluster",
                                 field="--address", fix="deploy one with `expertmesh serve` and pass its Ray address")
    return AppArgs.model_validate(stored)


def spec_path(path: str, app: AppArgs, state: RolloutState, coe: str = "") -> str:
    """A revision's spec file, absolute, loaded and checked against the app's zoo (every checkpoint present), of the
    CoE being changed (`coe`; "": the app's own), and unchanged since it was first served (replicas cache a revision
    by its path)."""
    p = Path(path).expanduser().resolve()
    spec = load_spec(p, zoo_root=Path(app.zoo))  # a SpecError names every problem, before anything changes
    name = coe or load_spec(app.spec).name
    if spec.name != name:
        raise InvalidArgument(f"{p} is CoE {spec.name!r}, the change is for {name!r}", field="SPEC",
                              fix=f"give the new revision the same name ({name!r}), or change that CoE with "
                                  f"`--coe {spec.name}` when the app serves it (`expertmesh serve --coe`)")
    if state.digests.get(str(p), digest(p)) != digest(p):
        raise FailedPrecondition(f"{p} changed since it was served (running replicas hold the old one)", field="SPEC",
                                 fix="write the change into a new spec file (e.g. with a new version) and use that")
    return str(p)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def plan_steps(args: argparse.Namespace, state: RolloutState, app: AppArgs, coe: str = "") -> list[RolloutState]:
    """The change's steps for `coe` ("": the app's own CoE), each recording the digest of every spec file it serves."""
    steps = _steps(args, state, app, coe)
    digests = {**state.digests, **{p: digest(Path(p)) for s in steps for p in s.in_use() if p}}
    return [s.model_copy(update={"digests": digests}) for s in steps]


def _steps(args: argparse.Namespace, state: RolloutState, app: AppArgs, coe: str = "") -> list[RolloutState]:
    try:
        if args.action == "update":
            return rollout.update(state, spec_path(_needs_spec(args), app, state, coe))
        if args.action == "canary":
            if not args.factory:
                raise InvalidArgument("`rollout canary` needs --factory", field="--factory",
                                      fix="name the factory whose requests the canary takes a share of")
            if not 0 < args.share <= 1:
                raise InvalidArgument(f"--share {args.share} is not in (0, 1]", field="--share",
                                      fix="give the canary's share of the factory's requests, e.g. 0.1")
            factories = TokenTable.load(app.tokens_file).factories
            if args.factory not in factories:
                raise InvalidArgument(f"factory {args.factory!r} is not in the tokens file", field="--factory",
                                      fix=f"use one of: {', '.join(sorted(factories))}")
            return rollout.start_canary(state, spec_path(_needs_spec(args), app, state, coe), args.factory, args.share)
        if args.action == "promote":
            return rollout.promote(state)
        return rollout.rollback(state)
    except RolloutRefused as exc:
        raise FailedPrecondition(str(exc), field=args.action, fix="see `expertmesh rollout status`") from None


def _needs_spec(args: argparse.Namespace) -> str:
    if not args.spec:
        raise InvalidArgument(f"`rollout {args.action}` needs the new revision's spec file", field="SPEC",
                              fix=f"expertmesh rollout {args.action} path/to/spec-v2.yaml")
    return args.spec


def apply(app: AppArgs, steps: list[RolloutState], log: Callable[[str], None] = print,
          timeout_s: float = 300.0, coe: str = "") -> RolloutState:
    """Apply each step of CoE `coe`'s change ("": the app's own CoE): store it, redeploy the app, wait until it runs;
    on a failed step, restore the state before the change. Returns the final state."""
    before = rollout_store.read(coe)
    try:
        for i, step in enumerate(steps, 1):
            t0 = time.perf_counter()
            rollout_store.write(step, coe)
            runner.redeploy(_current(app), timeout_s=timeout_s)  # a re-plan since may have moved the placement
            what = "hosts and ingress learnt the revisions" if i < len(steps) else "router switched"
            log(f"step {i}/{len(steps)}: {what} ({time.perf_counter() - t0:.1f} s)")
    except Exception as failure:
        log(f"the change failed ({failure}); restoring rollout revision {before.revision}")
        try:  # the router back first, with every revision still known, then the hosts
            rollout_store.write(before.model_copy(update={"known": tuple(dict.fromkeys(
                (*before.known, *steps[-1].known)))}), coe)
            runner.redeploy(_current(app), timeout_s=timeout_s)
            rollout_store.write(before, coe)
            runner.redeploy(_current(app), timeout_s=timeout_s)
        except Exception as restore:  # noqa: BLE001 - report both; the change's own error is the one raised
            log(f"restoring failed too ({restore}): check `expertmesh rollout status` and `serve status`")
        raise
    return steps[-1]


def _current(app: AppArgs) -> AppArgs:
    """The app's build arguments as last stored (a re-plan stores its placement), else those given."""
    stored = rollout_store.read_app_args()
    return AppArgs.model_validate(stored) if stored else app


def _label(path: str, served: str | None) -> str:
    spec = load_spec(path or served)
    return f"{revision_label(spec)} ({path or 'deployed with the app: ' + (served or 'the embedded spec')})"


def describe(state: RolloutState, app: AppArgs, name: str = "", served: str | None = None) -> str:
    """One CoE's live-change state (`name`, deployed from `served`; default: the app's own CoE)."""
    served = served if name else app.spec
    coe = f"CoE {name}: " if name else ""
    flag = f" --coe {name}" if name and served != app.spec else ""
    lines = [f"{coe}rollout revision {state.revision}" + (f": {state.note}" if state.note else " (as deployed)"),
             f"  stable:   {_label(state.stable, served)}"]
    if state.canary is not None:
        lines.append(f"  canary:   {_label(state.canary.spec, served)}, {state.canary.share:.0%} of "
                     f"{state.canary.factory}'s requests")
    if state.previous is not None:
        lines.append(f"  previous: {_label(state.previous, served)} (`expertmesh rollout rollback{flag}` returns to it)")
    return "\n".join(lines)


def read_comparisons(timeout_s: float = 5.0) -> dict[tuple[str, str, str], dict[str, float]]:
    """(canary, stable, rollout revision) -> outcome -> count, summed over every node's metrics endpoint."""
    name = EXPORTED_PREFIX + "expertmesh_canary_comparisons_total"
    out: dict[tuple[str, str, str], dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for target in scrape_targets():
        with urllib.request.urlopen(f"http://{target}/metrics", timeout=timeout_s) as r:
            text = r.read().decode()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == name:
                    key = (s.labels.get("canary", ""), s.labels.get("stable", ""), s.labels.get("rollout", ""))
                    out[key][s.labels.get("outcome", "")] += float(s.value)
    return out


def format_comparisons(found: dict[tuple[str, str, str], dict[str, float]], states: dict[str, RolloutState]) -> str:
    """The canary comparisons of the CoEs in `states` (spec name -> its live change; a canary's label names its CoE),
    the running canary's marked current."""
    found = {k: n for k, n in found.items() if k[0].split("@")[0] in states}
    if not found:
        return "canary agreement: no canary answers counted yet (Ray reports metrics every few seconds)"
    lines = ["canary agreement (each canary answer against the stable revision's answer to the same image):",
             f"  {'canary':<22}{'stable':<22}{'rollout':>8}{'answers':>9}{'agree':>8}{'disagree':>10}{'failed':>8}"
             f"{'agreement':>11}"]
    for (canary, stable, rev), n in sorted(found.items(), key=lambda kv: -int(kv[0][2] or 0)):
        total = sum(n.values())
        share = n.get("agree", 0.0) / total if total else 0.0
        state = states[canary.split("@")[0]]
        current = " (current)" if rev == str(state.revision) and state.canary is not None else ""
        lines.append(f"  {canary:<22}{stable:<22}{rev:>8}{total:>9.0f}{n.get('agree', 0):>8.0f}"
                     f"{n.get('disagree', 0):>10.0f}{n.get('failed', 0):>8.0f}{share:>10.1%}{current}")
    return "\n".join(lines)
