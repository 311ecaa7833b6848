"""An expert's model architecture in the CoE spec (`architecture:`), and what an expert gets when it leaves it out.

A Hugging Face image classifier built from a config (never downloaded), or a local checkpoint directory
(`family: pretrained`). `experts.spec` re-exports these names.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ARCHITECTURE_FAMILIES = ("resnet", "vit", "pretrained")

#: What an expert gets when its spec leaves `architecture` out: pcb-aoi's small ResNet (about 79K parameters with 5
#: labels; 3 stages of one basic block each, 16-32-64 channels), which trains in seconds to minutes on 2 cores.
DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "family": "resnet",
    "config": {"embedding_size": 16, "hidden_sizes": [16, 32, 64], "depths": [1, 1, 1], "layer_type": "basic"}}
#: What an expert gets when its spec leaves `input_size_px` out (pcb-aoi's size for most of its experts).
DEFAULT_INPUT_SIZE_PX = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchitectureSpec(_Strict):
    """A Hugging Face image-classifier architecture built from a config (never downloaded), or (family `pretrained`)
    a local checkpoint directory of any family AutoModelForImageClassification loads, used as is or fine-tuned."""

    family: Literal["resnet", "vit", "pretrained"]
    config: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the family's HF config class")
    path: str | None = Field(None, description="pretrained: the checkpoint directory, relative to the spec file "
                             "(or absolute); config.json + weights, optionally preprocessor_config.json")

    @model_validator(mode="after")
    def _path_iff_pretrained(self) -> ArchitectureSpec:
        if self.family == "pretrained":
            if not self.path:
                raise ValueError("family pretrained needs path; give path: DIR, a local checkpoint directory "
                                 "(config.json + weights)")
            if self.config:
                raise ValueError("family pretrained takes its config from the checkpoint; remove config")
        elif self.path is not None:
            raise ValueError(f"path is only for family pretrained (this is {self.family!r}); remove path, or use "
                             "family: pretrained")
        return self

    @field_validator("config")
    @classmethod
    def _no_label_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        for key in ("num_labels", "id2label", "label2id", "image_size", "num_channels"):
            if key in v:
                raise ValueError(f"config key {key!r} is derived from the expert (labels, input_size_px); remove it")
        return v
