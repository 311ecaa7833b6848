"""Hugging Face image classifiers built from configs (never downloaded): construction and loading."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForImageClassification,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.utils import logging as hf_logging

from expertmesh.errors import FailedPrecondition
from expertmesh.experts.spec import ExpertSpec

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

_FAMILIES = {
    "resnet": (ResNetConfig, ResNetForImageClassification),
    "vit": (ViTConfig, ViTForImageClassification),
}


def build_config(expert: ExpertSpec):
    if expert.architecture.family == "pretrained":
        raise ValueError("a pretrained expert's config is its checkpoint's; use build_model")
    config_cls, _ = _FAMILIES[expert.architecture.family]
    kwargs = dict(expert.architecture.config)
    kwargs.update(num_channels=3, num_labels=len(expert.labels),
                  id2label=dict(enumerate(expert.labels)), label2id={l: i for i, l in enumerate(expert.labels)})
    if expert.architecture.family == "vit":
        kwargs["image_size"] = expert.input_size_px
    return config_cls(**kwargs)


def build_model(expert: ExpertSpec, seed: int) -> PreTrainedModel:
    """A freshly initialised model for `expert`, deterministic for `seed`. A pretrained expert (architecture.path, an
    absolute or cwd-relative directory) starts from its checkpoint, local files only; a head whose labels differ
    from the spec's is replaced by a new one (initialised for `seed`) to fine-tune."""
    if expert.architecture.family == "pretrained":
        torch.manual_seed(seed)
        labels = list(expert.labels)
        return AutoModelForImageClassification.from_pretrained(
            str(expert.architecture.path), local_files_only=True, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},
            ignore_mismatched_sizes=True)
    _, model_cls = _FAMILIES[expert.architecture.family]
    torch.manual_seed(seed)
    return model_cls(build_config(expert))


def load_model(expert: ExpertSpec, checkpoint_dir: Path) -> PreTrainedModel:
    """Load a checkpoint saved with save_pretrained, onto the host, checking its labels match the spec."""
    model = AutoModelForImageClassification.from_pretrained(str(checkpoint_dir), local_files_only=True)
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    if labels != list(expert.labels):
        raise FailedPrecondition(f"checkpoint {str(checkpoint_dir)!r} has labels {labels}, the spec says {expert.labels}",
                                 field=f"experts.{expert.name}.labels", fix="rebuild the zoo (`expertmesh zoo build`)")
    return model.eval()


def parameter_bytes(model: torch.nn.Module) -> int:
    """Memory footprint of parameters plus buffers, in bytes."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
