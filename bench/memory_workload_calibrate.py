"""Making seeded (untrained) experts behave like a workload's experts: label mixes and trigger rates.

A freshly initialised classifier gives nearly the same label to every image, so its dependency edges would fire
always or never. `calibrate_bias` shifts the classifier's output bias (nothing else) so that its labels on a
calibration sample of workload images follow a chosen mix; `choose_on_labels` then picks the trigger labels whose
share lands nearest an edge's target rate, and `edge_rate` measures P(trigger | upstream ran) on held-out images,
weighting each image by how likely it reaches the upstream (a detector sees only images its upstream components
triggered on). Pure numpy except `expert_logits` and `shift_classifier_bias`, which touch the model.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import torch

CALIBRATION_ROUNDS = 400
_BATCH = 128


@torch.inference_mode()
def expert_logits(model: torch.nn.Module, pixel_values: torch.Tensor) -> np.ndarray:
    """Logits [N, num_labels] (float64) of a HF image classifier on preprocessed images [N, 3, S, S]."""
    model.eval()
    parts = [model(pixel_values=pixel_values[i:i + _BATCH]).logits.double().numpy()
             for i in range(0, len(pixel_values), _BATCH)]
    return np.concatenate(parts)


def label_shares(labels: np.ndarray, num_labels: int, weights: np.ndarray | None = None) -> np.ndarray:
    counts = np.bincount(labels, weights=weights, minlength=num_labels).astype(float)
    return counts / max(counts.sum(), 1e-12)


def calibrate_bias(logits: np.ndarray, target_mix: Sequence[float]) -> np.ndarray:
    """A bias offset [num_labels] so that argmax(logits + offset) has label shares near `target_mix`.

    Multiplicative updates in log space on smoothed shares, with a decaying step; the offset of the smallest total
    variation distance seen is returned (argmax shares are a step function, so the iteration may oscillate)."""
    target = np.asarray(target_mix, dtype=float)
    target = target / target.sum()
    n, num_labels = logits.shape
    scale = float(np.std(logits)) or 1.0
    offset = np.zeros(num_labels)
    best, best_tv = offset.copy(), np.inf
    for step in range(CALIBRATION_ROUNDS):
        counts = np.bincount((logits + offset).argmax(axis=1), minlength=num_labels)
        shares = counts / n
        tv = 0.5 * float(np.abs(shares - target).sum())
        if tv < best_tv:
            best, best_tv = offset.copy(), tv
        if tv < 0.5 / n:
            break
        smoothed = (counts + 0.5) / (n + 0.5 * num_labels)
        lr = 0.5 * scale / (1.0 + step / 40.0)
        offset = offset + lr * (np.log(target) - np.log(smoothed))
        offset -= offset.mean()
    return best


@torch.no_grad()
def shift_classifier_bias(model: torch.nn.Module, offset: np.ndarray) -> None:
    """Add `offset` to the bias of the model's last linear layer (HF ResNet/ViT: model.classifier)."""
    head = model.classifier[-1] if isinstance(model.classifier, torch.nn.Sequential) else model.classifier
    head.bias += torch.as_tensor(offset, dtype=head.bias.dtype)


def weighted_share(labels: np.ndarray, on: Sequence[int], weights: np.ndarray) -> float:
    """Weighted share of images whose label is in `on` (0 when no image has weight)."""
    total = float(weights.sum())
    return float(weights[np.isin(labels, list(on))].sum()) / total if total > 0 else 0.0


def choose_on_labels(labels: np.ndarray, weights: np.ndarray, label_names: Sequence[str],
                     target_rate: float) -> tuple[list[str], float]:
    """The proper, non-empty label subset whose weighted share is nearest `target_rate` (fewer labels, then earlier
    labels, on ties); returns the labels in label order and their share."""
    best: tuple[float, int, tuple[int, ...]] | None = None
    for k in range(1, len(label_names)):
        for subset in itertools.combinations(range(len(label_names)), k):
            key = (abs(weighted_share(labels, subset, weights) - target_rate), k, subset)
            if best is None or key < best:
                best = key
    assert best is not None  # labels has at least 2 names (ExpertSpec requires it)
    subset = best[2]
    return [label_names[i] for i in subset], weighted_share(labels, subset, weights)


def edge_rate(labels: np.ndarray, on_labels: Sequence[str], label_names: Sequence[str], reach: np.ndarray) -> float:
    """P(the upstream's label is in on_labels | it ran), images weighted by `reach` (how likely each reaches it)."""
    return weighted_share(labels, [label_names.index(x) for x in on_labels], reach)
