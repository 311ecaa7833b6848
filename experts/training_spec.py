"""How the zoo builder trains an expert (the spec's `training:`): on generated images, or on labeled files
(`data:`; `experts/labeled_data.py` reads them). Pydantic models only; `experts.spec` re-exports them."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


AUGMENTATIONS = ("rot90", "hflip", "vflip", "brightness")
#: Training keys that only exist since training from files: left out of a checkpoint's fingerprint while unset,
#: so the experts of specs written before them keep their fingerprints (and their checkpoints stay current).
FILE_DATA_KEYS = ("data", "validation_fraction", "test_fraction", "augment", "early_stopping_patience",
                  "class_weighting", "init_from", "select_epoch_by")


class DataSpec(_Strict):
    """Labeled images on disk: a folder `<folder>/<label>/*`, or a manifest (CSV or JSON lines) of path, label,
    and optionally category, split, weight. Paths are relative to the spec file (or absolute)."""

    folder: str | None = Field(None, description="a folder holding one sub-folder of images per label")
    manifest: str | None = Field(None, description="a .csv, .jsonl or .ndjson file; its paths relative to its folder")
    label_field: Literal["label", "category"] | None = Field(
        None, description="the manifest column that is the label; default: category for the router, else label")
    categories: list[str] | None = Field(None, description="manifest only: keep just the rows of these categories")

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        if (self.folder is None) == (self.manifest is None):
            given = "both folder and manifest" if self.folder is not None else "neither folder nor manifest"
            raise ValueError(f"training.data gives {given}; give exactly one: {{folder: PATH}} or {{manifest: PATH}}")
        if self.folder is not None and (self.label_field is not None or self.categories is not None):
            raise ValueError("label_field and categories apply to a manifest, not a folder (its sub-folders are the "
                             "labels); remove them or use a manifest")
        return self


class TrainingSpec(_Strict):
    """How the zoo builder trains this expert: on generated data (`target`, ...) or on labeled files (`data`).

    The keys of FILE_DATA_KEYS default to None, meaning the data source's default (see `training.resolve_plan`)."""

    target: Literal["component", "defect"] | None = Field(None, description="generated data: what the label is")
    components: list[str] | None = Field(None, description="generator components to train on; default: the ones routed here")
    defects: list[str] | None = Field(None, description="generator defects to train on; default: the keys of label_map, else all")
    label_map: dict[str, str] = Field(default_factory=dict, description="ground-truth value -> expert label (identity when absent)")
    num_train_per_label: int = Field(400, ge=4, le=100_000)
    epochs: int = Field(8, ge=1, le=200)
    batch_size: int = Field(64, ge=1, le=4096)
    learning_rate: float = Field(3e-3, gt=0, lt=1)
    data: DataSpec | None = Field(None, description="train on these labeled images instead of generated ones")
    validation_fraction: float | None = Field(None, ge=0, lt=1, description="held out per label; default 0.2 for "
                                              "file data, 0 (no hold-out) for generated data")
    test_fraction: float | None = Field(None, ge=0, lt=1, description="file data: held out per label for the report "
                                        "(never trained on, never used to stop or calibrate); default 0.2, or 0 when "
                                        "a manifest marks rows split: test")
    augment: list[str] | None = Field(None, description=f"any of {list(AUGMENTATIONS)}, or 'none'; default rot90, hflip")
    early_stopping_patience: int | None = Field(None, ge=1, le=1000, description="epochs without a better validation "
                                                "accuracy before stopping; default 3")
    class_weighting: Literal["balanced", "none"] | None = Field(None, description="default: balanced for file data")
    select_epoch_by: Literal["accuracy", "balanced_accuracy", "verdict_accuracy"] | None = Field(
        None, description="the validation score that picks the epoch kept (and that early stopping watches): the "
        "label's accuracy, its balanced accuracy, or the PASS/DEFECT verdict's accuracy (needs pass_labels); "
        "default: balanced_accuracy with class_weighting balanced, else accuracy")
    init_from: str | None = Field(None, description="start from this other expert's trained weights (a new head when "
                                  "the labels differ): a backbone shared across experts, trained on all their images "
                                  "(as CCoE shares one); it must have the same architecture and input size")

    @field_validator("augment", mode="before")
    @classmethod
    def _augmentations(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, str):
            v = [] if v == "none" else [v]
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ValueError(f"augment {v!r} is not a list of names; give a list from {list(AUGMENTATIONS)}, or 'none'")
        unknown = [x for x in v if x not in AUGMENTATIONS]
        if unknown:
            raise ValueError(f"augment {unknown} unknown; use any of {list(AUGMENTATIONS)}, or 'none' for no augmentation")
        if len(set(v)) != len(v):
            raise ValueError(f"augment {v} lists a name twice; list each augmentation once")
        return v

    @model_validator(mode="after")
    def _one_kind_of_data(self) -> TrainingSpec:
        if self.data is None:
            if self.target is None:
                raise ValueError("training has neither target nor data; give target: component|defect to train on "
                                 "generated images, or data: {folder: PATH} to train on your own")
            if self.test_fraction:
                raise ValueError("test_fraction applies to training.data (file data); generated data is scored on "
                                 "freshly generated images: remove test_fraction")
            return self
        generated_only = [k for k in ("target", "components", "defects", "num_train_per_label")
                          if k in self.model_fields_set]
        if generated_only:
            raise ValueError(f"training.data is given, so {generated_only} (generated data) do not apply; remove them")
        return self
