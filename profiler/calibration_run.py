"""`expertmesh zoo calibrate`'s work: measure every expert on validation images, then let `experts.calibration`
decide the table and the threshold, and write the new spec version.

Validation images are generated (the spec's generator) with their own seed, `spec.seed + CALIBRATION_SEED_OFFSET`,
distinct from the training seed and from the held-out seed `zoo report` scores on, so the report of the calibrated
spec is not measured on the images the table was chosen on. A CoE whose router trains on labeled files is measured
on its files instead: the `validation` images no model trained on (`experts/file_eval.py`), each with the category
its manifest row, its expert's one category or the router's label gives it; candidates are the experts that know
every label of a category's images. Every expert runs once on every image (batched, with a
progress bar); the choices are then pure functions of those outputs. Costs: each expert's profiled latency at
batch 1 on cpu (`--profile`, default `<zoo>/profile.json`) when every classify expert has a current entry, else its
parameter count.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from pydantic import BaseModel
from tqdm import tqdm

from expertmesh.errors import InvalidArgument
from expertmesh.experts import calibration as cal
from expertmesh.experts import file_eval
from expertmesh.experts.line_figures import line_figures
from expertmesh.experts.offline import load_runtime, predict, probabilities
from expertmesh.experts.operating_point import (choose_pass_min_probability, decide, flag_rates, pass_mask,
                                                pass_probability)
from expertmesh.experts.pcb_aoi import dataset
from expertmesh.experts.pcb_aoi.truth import NO_DEFECT
from expertmesh.experts.spec import CoESpec, check_spec, parse_spec
from expertmesh.profiler.serving_profiles import default_store_path, usable_profiles
from expertmesh.profiler.store import ProfileStore
from expertmesh.router.plan import ExpertOutput


class TableRow(BaseModel):
    category: str
    current: list[str]
    chosen: list[str]
    score: float
    current_score: float
    cost: float
    reason: str


class ThresholdResult(BaseModel):
    target_wrong_route: float
    min_confidence: float
    wrong_route_rate: float
    fallback_rate: float
    reachable: bool
    lowest_wrong_route_rate: float
    current_min_confidence: float
    current_wrong_route_rate: float
    current_fallback_rate: float


class OperatingPointRow(BaseModel):
    """One expert's operating point before and after, on the validation images of the categories it judges."""

    expert: str
    current: float | None
    chosen: float
    defect_recall_current: float
    defect_recall: float
    false_call_rate_current: float
    false_call_rate: float
    num_defective: int
    num_good: int
    reached: bool


class CalibrationResult(BaseModel):
    spec: str
    version: int
    new_version: int
    validation_seed: int
    source: str = "generated"  # or "files": the labeled files' validation images no model trained on
    num_images: int
    scores: dict[str, dict[str, float]]  # category -> option ("a" or "a+b") -> verdict accuracy
    costs: dict[str, float]
    cost_unit: str  # ms (profiled latency at batch 1) or params
    table: list[TableRow]
    threshold: ThresholdResult
    router_pairs: list[tuple[float, bool]]  # (top category score, routed right) per validation image
    dropped_experts: list[str]
    verdict_accuracy_current: float  # the whole CoE on the validation images, current spec
    verdict_accuracy_calibrated: float
    target_defect_recall: float | None = None
    operating_points: list[OperatingPointRow] = []
    defect_recall_current: float | None = None  # the whole CoE on the validation images
    defect_recall_calibrated: float | None = None
    false_call_rate_current: float | None = None
    false_call_rate_calibrated: float | None = None
    seconds: float


def _refuse_mixed_data(spec: CoESpec) -> None:
    """A router on generated images with experts on files: neither source has every category's images."""
    for i, e in enumerate(spec.experts):
        if file_eval.trains_on_files(e):
            raise InvalidArgument(
                f"expert {e.name!r} trains on labeled files but the router {spec.router.expert!r} on generated images; "
                "calibration measures on one source of validation images", field=f"experts[{i}].training.data",
                fix="train the router from the same files (training.data with a category per image: a folder per "
                    "category or a manifest's category column), or drop this expert's training.data")


def validation_images(spec: CoESpec, progress: bool = True
                      ) -> tuple[np.ndarray, list[str], list[bool], dict[str, list[cal.Option]], int]:
    """The images calibration measures on, each one's true category and whether it is defective, the candidate
    options per category, and the seed (generated images) or split seed (files)."""
    if file_eval.router_on_files(spec):
        held = file_eval.held_out(spec, file_eval.read_splits(spec, progress=progress), "validation")
        if not len(held.images):
            raise InvalidArgument("no validation image is held out from every model, so nothing can be measured",
                                  field="experts[*].training.validation_fraction",
                                  fix="give the models a validation_fraction > 0 (the default is 0.2)")
        return held.images, held.categories, held.is_defect, file_eval.candidate_options(spec, held), spec.seed
    _refuse_mixed_data(spec)
    seed = spec.seed + cal.CALIBRATION_SEED_OFFSET
    pool = dataset.Pool.generate(dataset.eval_counts(spec), seed, desc="generating validation images",
                                 progress=progress)
    pairs = list(pool.images)
    images = np.concatenate([pool.images[p] for p in pairs])
    truth = [p for p in pairs for _ in range(len(pool.images[p]))]
    return images, [c for c, _ in truth], [d != NO_DEFECT for _, d in truth], cal.candidate_options(spec), seed


def expert_costs(spec: CoESpec, zoo_root: Path, profile: Path | None, params: dict[str, int],
                 warn=print) -> tuple[dict[str, float], str]:
    """Latency at batch 1 (ms, cpu entries of the profile) when every classify expert has a current entry, else
    parameters: one unit for all, so costs compare."""

    path = profile or default_store_path(zoo_root)
    names = [e.name for e in spec.experts if e.task == "classify"]
    if Path(path).is_file():
        usable = usable_profiles(ProfileStore.load(Path(path)), spec, zoo_root, "cpu", warn=warn)
        if all(n in usable for n in names):
            out = {}
            for n in names:
                b1 = next((b for b in usable[n].batches if b.batch_size == 1), None)
                out[n] = b1.median_ms if b1 is not None else usable[n].fit.predict_ms(1)
            return out, "ms"
        warn(f"profile {path} lacks current cpu entries of {sorted(set(names) - set(usable))}: costs are parameters")
    elif profile is not None:
        raise InvalidArgument(f"no profile at {path}", field="--profile", fix="run `expertmesh profile`, or leave "
                                                                              "--profile out to compare parameters")
    return {n: float(params[n]) for n in names}, "params"


def calibrate(spec: CoESpec, spec_data: dict, zoo_root: Path, config: cal.CalibrationConfig, *,
              profile: Path | None = None, progress: bool = True, warn=print) -> tuple[CalibrationResult, dict]:
    """Measure, choose, and build the new spec's mapping (validated against the zoo). Returns both."""
    t0 = time.perf_counter()
    zoo_root = Path(zoo_root)
    images, categories, is_defect, options, seed = validation_images(spec, progress)
    outputs: dict[str, list[ExpertOutput]] = {}
    probs: dict[str, np.ndarray] = {}  # with a recall target: each judging expert's softmax, to move its point
    params: dict[str, int] = {}
    router_preds = []
    for e in tqdm(spec.experts, desc="running every expert on every image", disable=not progress):
        rt = load_runtime(spec, e, zoo_root)
        params[e.name] = rt.num_parameters
        if e.name == spec.router.expert:
            router_preds = [(p.label, float(p.score)) for p in predict(rt, images)]
        elif config.target_defect_recall is not None and e.pass_labels:
            probs[e.name] = probabilities(rt, images)
            outputs[e.name] = _outputs_at(e, probs[e.name], e.pass_min_probability)
        else:
            outputs[e.name] = [ExpertOutput(e.name, p.label, float(p.score)) for p in predict(rt, images)]

    by_cat: dict[str, list[int]] = {}
    for i, cat in enumerate(categories):
        by_cat.setdefault(cat, []).append(i)
    scores = cal.score_options(spec, options, outputs, by_cat, is_defect)
    costs, unit = expert_costs(spec, zoo_root, profile, params, warn)
    current = {c.name: tuple(c.experts) for c in spec.categories}
    chosen = cal.choose_table(scores, options, costs, current, config)
    router_pairs = [(score, label == cat) for (label, score), cat in zip(router_preds, categories)]
    th = cal.threshold_for_target(router_pairs, config.target_wrong_route)
    new_data, dropped = cal.calibrated_spec_data(spec_data, {c: ch.option for c, ch in chosen.items()}, th)
    points: list[OperatingPointRow] = []
    current_outputs = outputs
    if config.target_defect_recall is not None:
        table = {c: ch.option for c, ch in chosen.items()}
        points, outputs = _operating_points(spec, table, categories, is_defect, probs, outputs,
                                            config.target_defect_recall)
        chosen_p = {row.expert: row.chosen for row in points}
        for e in new_data["experts"]:
            if e["name"] in chosen_p:
                e["pass_min_probability"] = chosen_p[e["name"]]
    new_spec = parse_spec(new_data, "<calibrated spec>")
    problems = check_spec(new_spec, zoo_root)
    if problems:  # cannot happen with a checked input spec; said plainly if it does
        raise InvalidArgument(f"the calibrated spec fails its checks: {'; '.join(map(str, problems))}",
                              field="categories", fix="report this; calibrate with the input spec unchanged")

    def outcomes_of(s: CoESpec, outs: dict[str, list[ExpertOutput]]) -> list:
        return cal.simulate_coe(s, router_preds, outs)

    before, after = outcomes_of(spec, current_outputs), outcomes_of(new_spec, outputs)

    def accuracy(outcomes: list) -> float:
        return float(np.mean([cal.verdict_correct(o.verdict, d) for o, d in zip(outcomes, is_defect)]))

    line_before = line_figures([o.verdict for o in before], is_defect)
    line_after = line_figures([o.verdict for o in after], is_defect)

    cur_wrong, cur_fb = cal.rates_at(router_pairs, spec.router.min_confidence)
    rows = [TableRow(category=c, current=list(current[c]), chosen=list(ch.option), score=ch.score,
                     current_score=scores[c].get(cal.option_name(current[c]), math.nan), cost=ch.cost,
                     reason=ch.reason) for c, ch in chosen.items()]
    result = CalibrationResult(
        spec=spec.name, version=spec.version, new_version=new_spec.version, validation_seed=seed,
        source="files" if file_eval.router_on_files(spec) else "generated",
        num_images=len(images), scores=scores, costs=costs, cost_unit=unit, table=rows,
        threshold=ThresholdResult(target_wrong_route=config.target_wrong_route, min_confidence=th.threshold,
                                  wrong_route_rate=th.wrong_route_rate, fallback_rate=th.fallback_rate,
                                  reachable=th.reachable, lowest_wrong_route_rate=th.lowest_rate,
                                  current_min_confidence=spec.router.min_confidence,
                                  current_wrong_route_rate=cur_wrong, current_fallback_rate=cur_fb),
        router_pairs=router_pairs, dropped_experts=dropped,
        verdict_accuracy_current=accuracy(before), verdict_accuracy_calibrated=accuracy(after),
        target_defect_recall=config.target_defect_recall, operating_points=points,
        defect_recall_current=_recall(line_before), defect_recall_calibrated=_recall(line_after),
        false_call_rate_current=line_before["false_call_rate"], false_call_rate_calibrated=line_after["false_call_rate"],
        seconds=time.perf_counter() - t0)
    return result, new_data


def _recall(figures: dict) -> float | None:
    return None if figures["escape_rate"] is None else 1.0 - figures["escape_rate"]


def _outputs_at(e, probs: np.ndarray, pass_min_probability: float | None) -> list[ExpertOutput]:
    """The expert's outputs at an operating point, from its softmax (what its runtime answers there)."""
    idx, score = decide(torch.from_numpy(np.asarray(probs)), pass_mask(e.labels, e.pass_labels), pass_min_probability)
    return [ExpertOutput(e.name, e.labels[i], float(p)) for i, p in zip(idx.tolist(), score.tolist())]


def _operating_points(spec: CoESpec, table: dict, categories: list[str], is_defect: list[bool],
                      probs: dict[str, np.ndarray], outputs: dict[str, list[ExpertOutput]], target: float
                      ) -> tuple[list[OperatingPointRow], dict[str, list[ExpertOutput]]]:
    """Each expert the new table sends a category to: the least pass_min_probability that finds `target` of the
    defects among those categories' validation images; the outputs every expert gives at its new point."""
    truth = np.asarray(is_defect, dtype=bool)
    rows, new_outputs = [], dict(outputs)
    for name, p in probs.items():
        judged = np.array([name in table.get(c, ()) for c in categories], dtype=bool)
        if not judged.any():
            continue
        e = spec.expert(name)
        p_pass = pass_probability(p[judged], e.labels, e.pass_labels)
        now = np.array([o.label not in e.pass_labels for o, j in zip(outputs[name], judged) if j])
        point = choose_pass_min_probability(p_pass, truth[judged], target)
        recall_now, false_now = flag_rates(now, truth[judged])
        rows.append(OperatingPointRow(expert=name, current=e.pass_min_probability, chosen=point.pass_min_probability,
                                      defect_recall_current=recall_now, defect_recall=point.defect_recall,
                                      false_call_rate_current=false_now, false_call_rate=point.false_call_rate,
                                      num_defective=point.num_defective, num_good=point.num_good,
                                      reached=point.reached))
        new_outputs[name] = _outputs_at(e, p, point.pass_min_probability)
    return rows, new_outputs


def format_result(r: CalibrationResult) -> str:
    chosen = {row.category: cal.Choice(tuple(row.chosen), row.score, row.cost, row.reason) for row in r.table}
    current = {row.category: tuple(row.current) for row in r.table}
    t = r.threshold
    where = (f"validation images of its files that no model trained on (split seed {r.validation_seed})"
             if r.source == "files" else f"validation images (seed {r.validation_seed})")
    lines = [f"Calibration of {r.spec} v{r.version} on {r.num_images} {where}: "
             f"verdict accuracy per category and table option (* chosen)", "",
             cal.format_matrix(r.scores, chosen, current, r.costs, r.cost_unit), "",
             f"router.min_confidence: {t.current_min_confidence:.4f} -> {t.min_confidence:.4f} (target wrong-route "
             f"rate {t.target_wrong_route:.4f}{'' if t.reachable else ', NOT REACHABLE'})",
             f"  wrong-route rate among accepted: {t.current_wrong_route_rate:.4f} -> {t.wrong_route_rate:.4f}; "
             f"fallback rate: {t.current_fallback_rate:.4f} -> {t.fallback_rate:.4f}"]
    if r.dropped_experts:
        lines.append(f"experts no longer reached, dropped from the new spec: {', '.join(r.dropped_experts)}")
    if r.target_defect_recall is not None:
        lines += ["", f"operating points for a defect recall of {r.target_defect_recall:.4f} (pass_min_probability: "
                  "a pass label only when the pass labels' probabilities add up to at least it)",
                  f"{'expert':<22}{'pass_min_probability':>24}{'defect recall':>18}{'false-call rate':>18}"
                  f"{'defective / good':>18}"]
        for p in r.operating_points:
            was = "argmax" if p.current is None else f"{p.current:.4f}"
            lines.append(f"{p.expert:<22}{was + ' -> ' + f'{p.chosen:.4f}':>24}"
                         f"{f'{p.defect_recall_current:.3f} -> {p.defect_recall:.3f}':>18}"
                         f"{f'{p.false_call_rate_current:.3f} -> {p.false_call_rate:.3f}':>18}"
                         f"{f'{p.num_defective} / {p.num_good}':>18}" + ("" if p.reached else "  NOT REACHED"))
        if r.defect_recall_current is not None:
            lines.append(f"CoE defect recall {r.defect_recall_current:.4f} -> {r.defect_recall_calibrated:.4f}, "
                         f"false-call rate {r.false_call_rate_current:.4f} -> {r.false_call_rate_calibrated:.4f}")
    lines.append(f"CoE verdict accuracy on these validation images: {r.verdict_accuracy_current:.4f} (v{r.version}) -> "
                 f"{r.verdict_accuracy_calibrated:.4f} (v{r.new_version}); calibrated in {r.seconds:.1f} s")
    return "\n".join(lines)


def _absolute_paths(data: dict, base_dir: Path) -> dict:
    """Paths the spec gives relative to its own file, made absolute for a spec written elsewhere."""
    if data.get("zoo_dir") and not Path(data["zoo_dir"]).is_absolute():
        data["zoo_dir"] = str((base_dir / data["zoo_dir"]).resolve())
    for e in data.get("experts", []):
        d = (e.get("training") or {}).get("data") or {}
        for key in ("folder", "manifest"):
            if d.get(key) and not Path(d[key]).is_absolute():
                d[key] = str((base_dir / d[key]).resolve())
    return data


def write_spec(new_data: dict, r: CalibrationResult, out: Path, source: str, base_dir: Path) -> None:
    """The new spec YAML, headed by comments: where it came from, the score matrix and the threshold."""
    out = Path(out)
    if out.resolve().parent != base_dir.resolve():
        new_data = _absolute_paths(new_data, base_dir)
    matrix = format_result(r).splitlines()
    header = [f"Written by `expertmesh zoo calibrate` from {source} (version {r.version} -> {r.new_version}).",
              "Table and router.min_confidence chosen from these measurements:", ""] + matrix
    text = "".join(f"# {line}".rstrip() + "\n" for line in header)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + yaml.safe_dump(new_data, sort_keys=False))


def write_json(r: CalibrationResult, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(r.model_dump(), indent=1))
