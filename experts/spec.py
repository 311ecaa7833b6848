"""The CoE spec: one YAML file describes a Collaboration-of-Experts; pydantic models hold it.

Field-level rules live in validators (their messages name the value and the fix); rules that
span the file (names that must exist, the dependency graph being acyclic, every expert being
reachable, checkpoints on disk) live in `check_spec`, which collects *every* problem so a user
fixes a spec in one pass. `load_spec` runs both and raises `SpecError` listing them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from expertmesh.errors import SpecError, SpecProblem
from expertmesh.experts.architecture_spec import (ARCHITECTURE_FAMILIES, DEFAULT_ARCHITECTURE,  # noqa: F401
                                                  DEFAULT_INPUT_SIZE_PX, ArchitectureSpec)
from expertmesh.experts.expert_spec import (DEFAULTED_FIELDS, NAME_PATTERN, AutoscalingSpec,  # noqa: F401
                                            ExpertSpec)
from expertmesh.experts.image_processing import PREPROCESSOR_FILE, read_processing
from expertmesh.experts.strict_yaml import DuplicateKeyError, load_strict
from expertmesh.experts.training_spec import (AUGMENTATIONS, FILE_DATA_KEYS, DataSpec,  # noqa: F401 (re-exported)
                                              TrainingSpec)
from expertmesh.home import expertmesh_home

PRETRAINED_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
CHECKPOINT_FILES = ("config.json", "model.safetensors")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouterSpec(_Strict):
    expert: str = Field(description="name of the expert with task 'route' whose labels are the categories")
    min_confidence: float = Field(0.5, ge=0, le=1, description="below this the request goes to the fallback")
    fallback_expert: str | None = Field(None, description="general expert for low-confidence inputs; none: verdict UNCERTAIN")
    expected_fallback_probability: float = Field(0.0, ge=0, le=1)


class CategorySpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    experts: list[str] = Field(min_length=1)
    probability: float = Field(ge=0, le=1, description="expected share of requests in this category")


class DependencySpec(_Strict):
    upstream: str
    on_labels: list[str] = Field(min_length=1, description="upstream output labels that trigger the downstream expert")
    downstream: str
    trigger_probability: float | None = Field(None, ge=0, le=1, description="expected P(trigger | upstream ran)")


class RuleMatch(_Strict):
    """All given keys must match (values are alternatives). Keys are request metadata fields."""

    component_hint: list[str] | None = None
    station_id: list[str] | None = None
    factory_id: list[str] | None = None
    product: list[str] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> RuleMatch:
        if not any(v for v in self.model_dump().values()):
            raise ValueError("match is empty; give at least one of component_hint, station_id, factory_id, product")
        return self


class GatingRuleSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    match: RuleMatch
    force_category: str | None = None
    add_experts: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _has_action(self) -> GatingRuleSpec:
        if self.force_category is None and not self.add_experts:
            raise ValueError(f"rule {self.name!r} does nothing; set force_category or add_experts")
        return self


class ImageLimits(_Strict):
    """What an image must be before the experts see it; every limit is checked before the pixels are decoded.

    `max_pixels` bounds the decoded array (a few KB of PNG can declare a 30000x30000 image); `max_jpeg_scans`
    bounds a progressive JPEG's decoding work (each scan is another pass over the whole image).

    `alpha_background` is the colour transparent pixels are composited onto (RGBA, LA, palette or key
    transparency). Black by default: a transparent pixel then reads as an empty, dark board area, which is
    what the default CoE's training images show around components; and it is what dropping the alpha gave
    (Pillow's plain RGB conversion, the old behaviour) for the many encoders that zero transparent pixels.
    """

    max_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    min_side_px: int = Field(16, ge=1)
    max_side_px: int = Field(4096, ge=16)
    max_aspect_ratio: float = Field(4.0, ge=1.0)
    max_pixels: int = Field(4_194_304, ge=256, description="decoded width x height at most (2048x2048)")
    max_jpeg_scans: int = Field(32, ge=1, description="scans (SOS markers) a JPEG may have; baseline has 1")
    alpha_background: tuple[int, int, int] = Field((0, 0, 0), description="RGB that transparent pixels show")

    @field_validator("alpha_background")
    @classmethod
    def _rgb_bytes(cls, v: tuple[int, int, int]) -> tuple[int, int, int]:
        bad = [c for c in v if not 0 <= c <= 255]
        if bad:
            raise ValueError(f"alpha_background {list(v)} has {bad} outside 0..255; give R, G, B each as an integer "
                             "0..255, e.g. [0, 0, 0] for black")
        return v

    @model_validator(mode="after")
    def _pixels_fit_min_side(self) -> ImageLimits:
        if self.max_pixels < self.min_side_px ** 2:
            raise ValueError(f"max_pixels {self.max_pixels} is below min_side_px² ({self.min_side_px ** 2}), so every "
                             "image would be refused; raise max_pixels or lower min_side_px")
        return self


class CoESpec(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]{0,62}$")
    version: int = Field(1, ge=1)
    description: str = ""
    zoo_dir: str | None = Field(None, description="default zoo directory, relative to the spec file")
    dataset: Literal["pcb-aoi"] = Field("pcb-aoi", description="the generator that trains the zoo")
    seed: int = Field(0, ge=0)
    num_eval_per_pair: int = Field(60, ge=1, le=100_000)
    image: ImageLimits = Field(default_factory=ImageLimits)
    router: RouterSpec
    experts: list[ExpertSpec] = Field(min_length=1)
    categories: list[CategorySpec] = Field(min_length=1)
    dependencies: list[DependencySpec] = Field(default_factory=list)
    gating_rules: list[GatingRuleSpec] = Field(default_factory=list)
    #: The folder relative paths in the spec (training.data) are resolved against: the spec file's, set by load_spec.
    _base_dir: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _router_task_defaults_to_route(self) -> CoESpec:
        for e in self.experts:
            if e.name == self.router.expert and "task" not in e.model_fields_set:
                object.__setattr__(e, "task", "route")  # frozen: set once, while validating
        return self

    @property
    def base_dir(self) -> Path:
        return self._base_dir if self._base_dir is not None else Path.cwd()

    def with_base_dir(self, base_dir: str | Path) -> CoESpec:
        """This spec with relative data paths resolved against `base_dir` (a copy; specs are frozen)."""
        out = self.model_copy()
        out._base_dir = Path(base_dir).resolve()
        return out

    def expert(self, name: str) -> ExpertSpec:
        for e in self.experts:
            if e.name == name:
                return e
        raise KeyError(name)

    @property
    def router_expert(self) -> ExpertSpec:
        return self.expert(self.router.expert)

    @property
    def input_sizes_px(self) -> tuple[int, ...]:
        """Every distinct expert input size: what the ingress resizes a decoded image to, once each."""
        return tuple(sorted({e.input_size_px for e in self.experts}))

    def category(self, name: str) -> CategorySpec:
        for c in self.categories:
            if c.name == name:
                return c
        raise KeyError(name)


# --------------------------------------------------------------------------- cross-field checks
def _dupes(items: list[str]) -> list[str]:
    return sorted({x for x in items if items.count(x) > 1})


class _Findings:
    """The problems found so far, in the order found, and the rule every reference to an expert obeys."""

    def __init__(self, spec: CoESpec) -> None:
        self.problems: list[SpecProblem] = []
        self.known = {e.name for e in spec.experts}
        self.listing = ", ".join(sorted(self.known))
        self.router = spec.router_expert if spec.router.expert in self.known else None

    def add(self, field: str, message: str, fix: str) -> None:
        self.problems.append(SpecProblem(field, message, fix))

    def expert_ref(self, field: str, name: str) -> bool:
        """True when `name` is a defined expert other than the router (else a problem is added)."""
        if name not in self.known:
            self.add(field, f"unknown expert {name!r}", f"define it under experts: or use one of: {self.listing}")
            return False
        if self.router is not None and name == self.router.name:
            self.add(field, f"{name!r} is the router", "route to classify experts, not to the router itself")
            return False
        return True


def check_spec(spec: CoESpec, zoo_root: Path | None = None) -> list[SpecProblem]:
    """Every problem that spans fields. `zoo_root` given: also check that each checkpoint is on disk."""
    found = _Findings(spec)
    _check_unique_names(spec, found)
    _check_router(spec, found)
    _check_categories(spec, found)
    graph = _check_dependencies(spec, found)
    _check_gating_rules(spec, found)
    _check_reachable(spec, graph, found)
    _check_pretrained(spec, found)
    _check_init_from(spec, found)
    if zoo_root is not None:
        _check_checkpoints(spec, zoo_root, found)
    return found.problems


def _check_init_from(spec: CoESpec, found: _Findings) -> None:
    """`training.init_from` names another expert of the same architecture and input size, without a cycle."""
    names = {e.name: e for e in spec.experts}
    for i, e in enumerate(spec.experts):
        source = e.training.init_from if e.training else None
        if source is None:
            continue
        field = f"experts[{i}].training.init_from"
        if source not in names or source == e.name:
            found.add(field, f"{source!r} is not another expert of this spec",
                      f"name the expert whose weights {e.name!r} starts from: one of {sorted(set(names) - {e.name})}")
            continue
        s = names[source]
        if (s.architecture, s.input_size_px) != (e.architecture, e.input_size_px):
            found.add(field, f"{source!r} has another architecture or input size than {e.name!r}",
                      "give both the same architecture and input_size_px (only the head may differ)")
        seen, at = {e.name}, s
        while at.training is not None and at.training.init_from is not None:
            if at.training.init_from in seen:
                found.add(field, f"init_from goes round in a circle through {sorted(seen)}",
                          "let one of them start from scratch (remove its init_from)")
                break
            seen.add(at.name)
            if at.training.init_from not in names:
                break
            at = names[at.training.init_from]


def pretrained_source(spec: CoESpec, expert: ExpertSpec) -> Path | None:
    """A pretrained expert's source checkpoint directory (relative paths against the spec file), else None."""
    if expert.architecture.family != "pretrained":
        return None
    p = Path(expert.architecture.path).expanduser()
    return p if p.is_absolute() else spec.base_dir / p


def _check_pretrained(spec: CoESpec, found: _Findings) -> None:
    """A pretrained expert's directory holds an HF checkpoint whose labels are the spec's (unless it is fine-tuned,
    which gives it a new head) and whose preprocessing gives the expert's input size. Nothing is downloaded."""
    for i, e in enumerate(spec.experts):
        src = pretrained_source(spec, e)
        if src is None:
            continue
        field = f"experts[{i}].architecture.path"
        if not src.is_dir():
            found.add(field, f"no checkpoint directory at {str(src)!r}",
                      "point path at a local Hugging Face image-classification checkpoint directory (saved with "
                      "save_pretrained); nothing is downloaded")
            continue
        if not (src / "config.json").is_file():
            found.add(field, f"checkpoint directory {str(src)!r} has no config.json",
                      "point path at the directory save_pretrained wrote (config.json + weights)")
            continue
        if not any((src / w).is_file() for w in PRETRAINED_WEIGHTS):
            found.add(field, f"checkpoint directory {str(src)!r} has no weights ({' or '.join(PRETRAINED_WEIGHTS)})",
                      "point path at the directory save_pretrained wrote (config.json + weights)")
        try:
            config = json.loads((src / "config.json").read_text())
            id2label = config.get("id2label") or {}
            theirs = [id2label[k] for k in sorted(id2label, key=int)]
        except (OSError, ValueError, KeyError) as exc:
            found.add(field, f"cannot read {str(src / 'config.json')!r}: {exc}", "fix or re-save the checkpoint")
            continue
        if e.training is None and theirs != list(e.labels):
            found.add(f"experts[{i}].labels", f"the checkpoint at {str(src)!r} has labels {theirs} (id2label, in "
                      f"order), the spec says {list(e.labels)}",
                      f"list the checkpoint's labels in its order: {theirs}, or add training: to fine-tune it to yours")
        try:
            processing = read_processing(src)
        except (OSError, ValueError) as exc:
            found.add(field, f"cannot use {str(src / PREPROCESSOR_FILE)!r}: {exc}", "fix the preprocessor config")
            continue
        size = processing.output_size if processing is not None else None
        if size is not None and size != (e.input_size_px, e.input_size_px):
            found.add(f"experts[{i}].input_size_px", f"input_size_px {e.input_size_px} differs from the size the "
                      f"checkpoint's {PREPROCESSOR_FILE} gives ({size[0]}x{size[1]})",
                      f"set input_size_px: {size[0]}" if size[0] == size[1] else
                      "use a checkpoint whose processed images are square")


def _check_unique_names(spec: CoESpec, found: _Findings) -> None:
    for what, items, noun, fix in (
            ("experts", [e.name for e in spec.experts], "expert name", "give every expert a unique name"),
            ("categories", [c.name for c in spec.categories], "category", "list each category once"),
            ("gating_rules", [r.name for r in spec.gating_rules], "rule name", "give every rule a unique name")):
        for name in _dupes(items):
            found.add(f"{what}[{items.index(name)}].name", f"duplicate {noun} {name!r}", fix)


def _check_router(spec: CoESpec, found: _Findings) -> None:
    """router.expert names an expert with task 'route' whose labels are the categories; no other expert routes."""
    router = found.router
    if router is None:
        found.add("router.expert", f"unknown expert {spec.router.expert!r}",
                  f"name an expert with task 'route' (defined: {found.listing})")
    else:
        if router.task != "route":
            found.add("router.expert", f"expert {router.name!r} has task {router.task!r}",
                      "the router expert needs task: route")
        categories = sorted({c.name for c in spec.categories})
        if sorted(router.labels) != categories:
            found.add("router.expert", f"router labels {sorted(router.labels)} differ from the categories {categories}",
                      "make the router expert's labels exactly the category names")
    for i, e in enumerate(spec.experts):
        if e.task == "route" and e.name != spec.router.expert:
            found.add(f"experts[{i}].task", f"expert {e.name!r} has task 'route' but is not router.expert",
                      "use task: classify, or make it router.expert")
    fallback = spec.router.fallback_expert
    if fallback is not None and fallback not in found.known:
        found.add("router.fallback_expert", f"unknown expert {fallback!r}", f"use one of: {found.listing}, or remove it")


def _check_categories(spec: CoESpec, found: _Findings) -> None:
    for i, c in enumerate(spec.categories):
        for j, name in enumerate(c.experts):
            found.expert_ref(f"categories[{i}].experts[{j}]", name)
    total = sum(c.probability for c in spec.categories)
    if not math.isclose(total, 1.0, abs_tol=1e-6):
        found.add("categories[*].probability", f"category probabilities sum to {total:.6g}, not 1",
                  "rescale the probabilities so they sum to 1")


def _check_dependencies(spec: CoESpec, found: _Findings) -> nx.DiGraph:
    """Each edge's ends and trigger labels, then the graph of the valid edges must be a DAG; returns that graph."""
    graph = nx.DiGraph()
    for i, d in enumerate(spec.dependencies):
        ok = (found.expert_ref(f"dependencies[{i}].upstream", d.upstream)
              & found.expert_ref(f"dependencies[{i}].downstream", d.downstream))  # both ends reported
        if not ok:
            continue
        up = spec.expert(d.upstream)
        bad = [x for x in d.on_labels if x not in up.labels]
        if bad:
            found.add(f"dependencies[{i}].on_labels", f"labels {bad} are not outputs of {up.name!r}",
                      f"use labels of {up.name!r}: {up.labels}")
        if d.upstream == d.downstream:
            found.add(f"dependencies[{i}]", f"expert {d.upstream!r} depends on itself", "remove the edge")
        graph.add_edge(d.upstream, d.downstream, index=i)
    try:
        cycle = nx.find_cycle(graph)
    except nx.NetworkXNoCycle:
        return graph
    if len(cycle) > 1:
        path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
        found.add(f"dependencies[{graph.edges[cycle[-1]]['index']}]", f"dependency cycle {path}",
                  "remove one edge of the cycle: dependencies must form a DAG")
    return graph


def _check_gating_rules(spec: CoESpec, found: _Findings) -> None:
    cat_names = [c.name for c in spec.categories]
    for i, r in enumerate(spec.gating_rules):
        if r.force_category is not None and r.force_category not in cat_names:
            found.add(f"gating_rules[{i}].force_category", f"unknown category {r.force_category!r}",
                      f"use one of: {', '.join(cat_names)}")
        for j, name in enumerate(r.add_experts):
            found.expert_ref(f"gating_rules[{i}].add_experts[{j}]", name)


def _check_reachable(spec: CoESpec, graph: nx.DiGraph, found: _Findings) -> None:
    """Every classify expert is reached by a category, a rule, the fallback, or a dependency from one of them."""
    reached = {n for c in spec.categories for n in c.experts} | {n for r in spec.gating_rules for n in r.add_experts}
    if spec.router.fallback_expert:
        reached.add(spec.router.fallback_expert)
    reached = reached & found.known
    for n in list(reached):
        if n in graph:
            reached |= nx.descendants(graph, n)
    for i, e in enumerate(spec.experts):
        if e.task == "classify" and e.name not in reached:
            found.add(f"experts[{i}]", f"expert {e.name!r} is reached by no category, rule, dependency or fallback",
                      "add it to a category's experts, a dependency's downstream, or remove it")


def _check_checkpoints(spec: CoESpec, zoo_root: Path, found: _Findings) -> None:
    for i, e in enumerate(spec.experts):
        ckpt = resolve_checkpoint(e, zoo_root)
        missing = [f for f in CHECKPOINT_FILES if not (ckpt / f).is_file()]
        if missing:
            found.add(f"experts[{i}].checkpoint", f"checkpoint {str(ckpt)!r} lacks {missing}",
                      "build it with `expertmesh zoo build`, or point checkpoint/--zoo at the directory that holds it")


def resolve_checkpoint(expert: ExpertSpec, zoo_root: Path) -> Path:
    p = Path(expert.checkpoint)
    return p if p.is_absolute() else Path(zoo_root) / p


# --------------------------------------------------------------------------- loading
def default_spec_path() -> Path:
    """The embedded default CoE: PCB automated optical inspection."""
    return Path(__file__).resolve().parent / "pcb_aoi" / "spec.yaml"


def default_zoo_root(spec: CoESpec, spec_path: Path | None = None) -> Path:
    """Where checkpoints live unless --zoo says otherwise: the spec's zoo_dir, else $EXPERTMESH_HOME/zoo/<name>."""
    if spec.zoo_dir is not None:
        base = spec_path.parent if spec_path is not None else Path.cwd()
        return (base / spec.zoo_dir).resolve()
    return (expertmesh_home() / "zoo" / spec.name).resolve()


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def parse_spec(data: Any, source: str = "<spec>", base_dir: str | Path | None = None) -> CoESpec:
    """Validate a mapping (parsed YAML) into a CoESpec, field rules and cross-field rules together."""
    if not isinstance(data, dict):
        raise SpecError([SpecProblem("<root>", f"expected a mapping at the top level, got {type(data).__name__}",
                                     "write the spec as YAML keys: name, router, experts, categories, ...")], source)
    try:
        spec = CoESpec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            msg, _, fix = msg.partition("; ")
            if not fix:
                fix = {"missing": "add this field", "extra_forbidden": "remove this key (check its spelling)"}.get(
                    err["type"], "see the spec reference in README.md")
            problems.append(SpecProblem(_loc(err["loc"]), msg, fix))
        raise SpecError(problems, source) from None
    if base_dir is not None:  # relative paths in the spec (pretrained checkpoints, training data) resolve against it
        spec = spec.with_base_dir(base_dir)
    problems = check_spec(spec)
    if problems:
        raise SpecError(problems, source)
    return spec


def load_spec(path: str | Path | None = None, *, zoo_root: Path | None = None) -> CoESpec:
    """Load and validate a spec file (default: the embedded pcb-aoi). With `zoo_root`, checkpoints must exist too."""
    path = Path(path) if path is not None else default_spec_path()
    if not path.is_file():
        raise SpecError([SpecProblem("<file>", f"no spec file at {str(path)!r}", "pass the path of a CoE spec YAML file")], str(path))
    try:
        data = load_strict(path.read_text())
    except DuplicateKeyError as exc:
        raise SpecError([SpecProblem(f"<line {exc.line}>", f"the key {exc.key!r} is given twice (lines {exc.first_line} "
                                     f"and {exc.line}); YAML would silently keep only the last",
                                     "keep one of them (merge what each says)")], str(path)) from None
    except yaml.YAMLError as exc:
        raise SpecError([SpecProblem("<yaml>", f"not valid YAML: {exc}", "fix the YAML syntax at the line shown")], str(path)) from None
    spec = parse_spec(data, str(path), base_dir=path.parent)
    if zoo_root is not None:
        problems = check_spec(spec, zoo_root)
        if problems:
            raise SpecError(problems, str(path))
    return spec
