"""One expert of the CoE spec (`experts[]`): what it is, its labels and what they mean, how it is served and trained.

An expert needs only `name` and `labels` (and `training.data` to train on the user's files); every other field
has a documented default, and `spec check` prints the values chosen (`ExpertSpec.defaults_chosen`). A label means
one verdict: PASS (`pass_labels`), UNCERTAIN (`uncertain_labels`: a person should look) or DEFECT (the rest).
`experts.spec` re-exports these names.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from expertmesh.experts.architecture_spec import DEFAULT_ARCHITECTURE, DEFAULT_INPUT_SIZE_PX, ArchitectureSpec
from expertmesh.experts.training_spec import TrainingSpec

NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingSpec(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(2, ge=1)
    target_ongoing_requests: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}; raise max_replicas")
        return self


#: The fields an expert may leave out, whose values `spec check` prints (`ExpertSpec.defaults_chosen`).
DEFAULTED_FIELDS = ("task", "architecture", "checkpoint", "input_size_px")


class ExpertSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    task: Literal["route", "classify"] = Field(
        "classify", description="route: the router's category classifier; classify: an expert. Default: route for "
        "the expert router.expert names, classify for every other")
    architecture: ArchitectureSpec = Field(default_factory=lambda: ArchitectureSpec(**DEFAULT_ARCHITECTURE),
                                           description="default: DEFAULT_ARCHITECTURE, a 79K-parameter ResNet")
    checkpoint: str = Field("", description="checkpoint directory, relative to the zoo directory (or absolute); "
                            "default: the expert's name")
    input_size_px: int = Field(DEFAULT_INPUT_SIZE_PX, ge=16, le=1024, description="the side the image is resized to; "
                               "larger crops with fine defects gain from more (ELPV's 300 px cells: 128 px, +2.6 points), "
                               "smaller ones lose from upscaling (96 px crops at 128 px: -12 points)")
    labels: list[str] = Field(min_length=2)
    pass_labels: list[str] = Field(default_factory=list, description="labels that mean 'no defect found here'")
    uncertain_labels: list[str] = Field(default_factory=list, description="labels that mean 'a person should look': "
                                        "verdict UNCERTAIN (unless another expert finds a defect)")
    pass_min_probability: float | None = Field(
        None, ge=0, le=1, description="the operating point: answer a pass label only when the pass labels' "
        "probabilities add up to at least this (else the likeliest other label); none: the likeliest label. "
        "`zoo calibrate --target-defect-recall` chooses it")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    max_batch: int = Field(16, ge=1, le=4096)
    autoscaling: AutoscalingSpec = Field(default_factory=AutoscalingSpec)
    training: TrainingSpec | None = None

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str]) -> list[str]:
        dupes = sorted({x for x in v if v.count(x) > 1})
        if dupes:
            raise ValueError(f"duplicate labels {dupes}; list each label once")
        return v

    @model_validator(mode="after")
    def _checkpoint_defaults_to_name(self) -> ExpertSpec:
        if not self.checkpoint:
            object.__setattr__(self, "checkpoint", self.name)  # frozen: set once, while validating
        return self

    def defaults_chosen(self) -> dict[str, str]:
        """The fields this expert's spec left out, each with the value it got (what `spec check` prints)."""
        out: dict[str, str] = {}
        for key in DEFAULTED_FIELDS:
            if key in self.model_fields_set:
                continue
            value = getattr(self, key)
            if key == "architecture":
                cfg = value.config
                value = (f"{value.family} {'-'.join(str(h) for h in cfg.get('hidden_sizes', []))} channels, "
                         f"depths {cfg.get('depths')}")
            out[key] = str(value)
        return out

    @model_validator(mode="after")
    def _labels_consistent(self) -> ExpertSpec:
        unknown = [x for x in self.pass_labels if x not in self.labels]
        if unknown:
            raise ValueError(f"pass_labels {unknown} are not in labels {self.labels}; add them to labels or drop them")
        if self.training is not None and self.training.select_epoch_by == "verdict_accuracy" and not self.pass_labels:
            raise ValueError("training.select_epoch_by verdict_accuracy needs pass_labels (the verdict is pass label "
                             "or not); add pass_labels or choose accuracy")
        unknown = [x for x in self.uncertain_labels if x not in self.labels]
        if unknown:
            raise ValueError(f"uncertain_labels {unknown} are not in labels {self.labels}; add them to labels or drop "
                             "them")
        both = [x for x in self.uncertain_labels if x in self.pass_labels]
        if both:
            raise ValueError(f"labels {both} are in both pass_labels and uncertain_labels; a label means one verdict: "
                             "keep it in one of them")
        if self.pass_min_probability is not None and not self.pass_labels:
            raise ValueError("pass_min_probability needs pass_labels (it is the least probability of passing); add "
                             "pass_labels or remove pass_min_probability")
        if self.training and self.training.label_map:
            stray = sorted(set(self.training.label_map.values()) - set(self.labels))
            if stray:
                raise ValueError(f"training.label_map maps to {stray}, which are not in labels; use one of {self.labels}")
        return self
