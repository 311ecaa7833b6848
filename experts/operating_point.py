"""An expert's operating point: when it answers a pass label, and how it is chosen for a target defect recall.

Without one an expert answers its likeliest label. With `pass_min_probability` p it answers a pass label only when
its pass labels' probabilities add up to at least p, else its likeliest other label: raising p trades false calls
(good parts flagged) for escapes (defects passed). `choose_pass_min_probability` picks the least p that reaches a
target recall of defects on held-out images (the fewest false calls that keep the escape rate at the target).
Pure: tensors and arrays in, decisions out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def decide(probs: torch.Tensor, pass_mask: torch.Tensor, pass_min_probability: float | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(label index, its probability) per row of `probs` [N, K]; `pass_mask` [K] marks the pass labels."""
    if pass_min_probability is None or not bool(pass_mask.any()) or bool(pass_mask.all()):
        scores, idx = probs.max(dim=-1)
        return idx, scores
    p_pass = probs[:, pass_mask].sum(dim=-1)
    best_pass = probs.masked_fill(~pass_mask, -1.0).argmax(dim=-1)
    best_other = probs.masked_fill(pass_mask, -1.0).argmax(dim=-1)
    idx = torch.where(p_pass >= pass_min_probability, best_pass, best_other)
    return idx, probs.gather(1, idx[:, None])[:, 0]


@dataclass(frozen=True)
class OperatingPoint:
    """What `choose_pass_min_probability` chose, and what it gives on the images it was chosen on."""

    pass_min_probability: float
    defect_recall: float  # of the defective images, the share not answered with a pass label
    false_call_rate: float  # of the good images, the share not answered with a pass label
    num_defective: int
    num_good: int
    reached: bool  # whether the target recall was reached (else: the point with the highest recall)


def choose_pass_min_probability(p_pass: np.ndarray, is_defect: np.ndarray, target_recall: float) -> OperatingPoint:
    """The least p with recall of defects >= target on these images, P(pass) `p_pass` and truth `is_defect`.

    An image is flagged when p_pass < p. The candidates are just above each image's p_pass (and 0: flag nothing),
    so the recall reached is exact on these images; ties keep the lower p (fewer false calls)."""
    p_pass, is_defect = np.asarray(p_pass, dtype=np.float64), np.asarray(is_defect, dtype=bool)
    n_def, n_good = int(is_defect.sum()), int((~is_defect).sum())
    candidates = np.unique(np.concatenate([[0.0], np.nextafter(p_pass, 2.0)]))
    candidates = np.clip(candidates, 0.0, 1.0)
    best = None
    for p in candidates:  # ascending: recall and false calls both grow with p
        recall, false_calls = flag_rates(p_pass < p, is_defect)
        point = OperatingPoint(float(p), recall, false_calls, n_def, n_good, recall >= target_recall)
        if point.reached:
            return point
        if best is None or recall > best.defect_recall:
            best = point
    return best


def flag_rates(flagged: np.ndarray, is_defect: np.ndarray) -> tuple[float, float]:
    """(defect recall, false-call rate) of `flagged` (not answered with a pass label) against the truth."""
    flagged, is_defect = np.asarray(flagged, dtype=bool), np.asarray(is_defect, dtype=bool)
    recall = float(flagged[is_defect].mean()) if is_defect.any() else 1.0
    false_calls = float(flagged[~is_defect].mean()) if (~is_defect).any() else 0.0
    return recall, false_calls


def pass_mask(labels: list[str], pass_labels: list[str]) -> torch.Tensor:
    """[K] booleans: which of an expert's labels are pass labels (what `decide` takes)."""
    return torch.tensor([label in pass_labels for label in labels], dtype=torch.bool)


def pass_probability(probs: np.ndarray, labels: list[str], pass_labels: list[str]) -> np.ndarray:
    """P(a pass label) per row of `probs` [N, K]."""
    return np.asarray(probs)[:, pass_mask(labels, pass_labels).numpy()].sum(axis=1)
