"""Training one image classifier on CPU (or CUDA) from in-memory uint8 images. Deterministic for a seed.

Given validation images, each epoch ends with the validation accuracy (balanced accuracy when the classes are
balanced in the loss); the best epoch's weights are kept and training stops after `early_stopping_patience` epochs
without a better one, but never in the first half of the epochs (`may_stop`: the one-cycle schedule anneals in the
second half). Given per-image weights (class
balancing times a manifest's weights), the loss is the weighted mean cross-entropy of each batch.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from torch.nn import functional as F
from transformers import PreTrainedModel

from expertmesh.experts.models import build_model
from expertmesh.experts.image_processing import read_processing
from expertmesh.experts.operating_point import pass_mask
from expertmesh.experts.preprocess import to_pixel_values
from expertmesh.experts.spec import ExpertSpec, TrainingSpec


@dataclass(frozen=True)
class TrainStats:
    num_images: int
    epochs: int
    seconds: float
    final_loss: float
    train_accuracy: float
    num_validation: int = 0
    validation_accuracy: float | None = None
    validation_balanced_accuracy: float | None = None
    best_epoch: int | None = None
    stopped_early: bool = False


@dataclass(frozen=True)
class TrainPlan:
    """The training choices the spec leaves to the data source (TrainingSpec's keys that default to None)."""

    validation_fraction: float
    test_fraction: float
    augment: tuple[str, ...]
    early_stopping_patience: int | None
    class_weighting: str
    select_epoch_by: str = "accuracy"


DEFAULT_AUGMENT = ("rot90", "hflip")  # what pcb-aoi has always used: every quarter turn and flip of the scene
#: Your files' default: flips only. On real inspection images (ELPV cells, bench/results/real_data.md) a quarter turn
#: cost 14 points of verdict accuracy (cells have an orientation: busbars), flips were neutral to +3; balanced class
#: weights cost 5 points of accuracy for their recall, which an operating point (`zoo calibrate
#: --target-defect-recall`) buys back explicitly.
FILE_AUGMENT = ("hflip", "vflip")


def resolve_plan(t: TrainingSpec) -> TrainPlan:
    """File data: 20% test (unless a manifest marks test rows), 20% validation, early stopping after 3 epochs,
    flips only, classes unweighted (FILE_AUGMENT: chosen on real images, bench/results/real_data.md). Generated data:
    as it always trained (no hold-out, all epochs, rot90 + hflip, no weighting: the generator balances the labels,
    and the report scores freshly generated images), unless the spec says."""
    files = t.data is not None
    fraction = t.validation_fraction if t.validation_fraction is not None else (0.2 if files else 0.0)
    return TrainPlan(
        validation_fraction=fraction,
        test_fraction=t.test_fraction if t.test_fraction is not None else (0.2 if files else 0.0),
        augment=tuple(t.augment) if t.augment is not None else (FILE_AUGMENT if files else DEFAULT_AUGMENT),
        early_stopping_patience=t.early_stopping_patience or (3 if fraction > 0 else None),
        class_weighting=t.class_weighting or "none",
        select_epoch_by=t.select_epoch_by or ("balanced_accuracy" if t.class_weighting == "balanced" else "accuracy"))


def _augment(x: torch.Tensor, gen: torch.Generator, augment: tuple[str, ...] = DEFAULT_AUGMENT) -> torch.Tensor:
    """Per batch: a random quarter turn, horizontal and vertical flips (label-preserving for every pcb-aoi task);
    per image: a random brightness gain in [0.8, 1.2]. The RNG is drawn only for the augmentations chosen, in
    this order, so the default draws exactly what it always drew."""
    if "rot90" in augment:
        k = int(torch.randint(0, 4, (1,), generator=gen))
        x = torch.rot90(x, k, dims=(2, 3))
    if "hflip" in augment and bool(torch.randint(0, 2, (1,), generator=gen)):
        x = torch.flip(x, dims=(3,))
    if "vflip" in augment and bool(torch.randint(0, 2, (1,), generator=gen)):
        x = torch.flip(x, dims=(2,))
    if "brightness" in augment:  # x is normalised to [-1, 1]: scale the [0, 1] image, then back
        gain = 0.8 + 0.4 * torch.rand((len(x), 1, 1, 1), generator=gen)
        x = ((x + 1) * gain).clamp(0, 2) - 1
    return x


@torch.no_grad()
def _scores(model: PreTrainedModel, x: torch.Tensor, y: torch.Tensor, batch_size: int, device: str,
            passing: torch.Tensor | None = None) -> tuple[float, float, float | None]:
    """`scores` of `model` on x, y."""
    model.eval()
    preds = []
    for s in range(0, len(x), batch_size):
        preds.append(model(pixel_values=x[s:s + batch_size].to(device)).logits.argmax(-1).cpu())
    model.train()
    return scores(torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long), y, passing)


def scores(pred: torch.Tensor, y: torch.Tensor, passing: torch.Tensor | None = None
           ) -> tuple[float, float, float | None]:
    """(accuracy, balanced accuracy: the mean of each present label's recall, verdict accuracy: pass label or not,
    as `passing` [K] marks them; None without it) of predicted labels against true ones (pure)."""
    if not len(y):
        return 0.0, 0.0, None if passing is None else 0.0
    hit = pred == y
    recalls = [float(hit[y == c].float().mean()) for c in torch.unique(y)]
    verdict = None if passing is None else float((passing[pred] == passing[y]).float().mean())
    return float(hit.float().mean()), float(np.mean(recalls)), verdict


def may_stop(epoch: int, epochs: int) -> bool:
    """Whether epoch (0-based) counts toward early stopping's patience: only those of the schedule's second half.
    One-cycle plans its learning rate over every epoch (warm-up, then annealing), so an epoch of the first half is
    judged at a high learning rate, and a stop there keeps weights the annealing never refined (an expert once stopped
    at epoch 13 of 40, keeping epoch 1). So training runs at least half its epochs plus the patience."""
    return epoch + 1 > epochs // 2


def train_classifier(expert: ExpertSpec, images: np.ndarray, labels: np.ndarray, *, seed: int,
                     training: TrainingSpec | None = None, device: str = "cpu", progress: bool = True,
                     plan: TrainPlan | None = None, validation: tuple[np.ndarray, np.ndarray] | None = None,
                     weights: np.ndarray | None = None) -> tuple[PreTrainedModel, TrainStats]:
    """Train a fresh model for `expert` on uint8 images [N, H, W, 3] and integer labels [N].

    `validation`: (images, labels) scored after every epoch (early stopping, best epoch kept); `weights`: per
    training image, for the loss. Without either, and with the default plan, training is what it always was."""
    t = training or expert.training
    plan = plan or resolve_plan(t)
    t0 = time.perf_counter()
    # a pretrained expert (fine-tuned) trains on its checkpoint's own preprocessing, as it is served
    processing = read_processing(expert.architecture.path) if expert.architecture.family == "pretrained" else None
    x_all = to_pixel_values(images, expert.input_size_px, processing)
    y_all = torch.from_numpy(labels)
    w_all = torch.from_numpy(np.asarray(weights, dtype=np.float32)) if weights is not None else None
    x_val = y_val = None
    if validation is not None and len(validation[1]):
        x_val, y_val = to_pixel_values(validation[0], expert.input_size_px, processing), torch.from_numpy(validation[1])
    model = build_model(expert, seed).to(device).train()
    verdict_mask = pass_mask(expert.labels, expert.pass_labels) if expert.pass_labels else None
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, (len(x_all) + t.batch_size - 1) // t.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.learning_rate, total_steps=t.epochs * steps_per_epoch,
                                                pct_start=0.15)
    loss_ema, correct, seen = 0.0, 0, 0
    best: tuple | None = None  # (score, epoch, weights, validation accuracy, balanced accuracy)
    epochs_run, since_best, val_acc = 0, 0, None
    bar = tqdm(total=t.epochs * steps_per_epoch, desc=f"train {expert.name}", unit="step", disable=not progress, leave=False)
    for epoch in range(t.epochs):
        order = torch.randperm(len(x_all), generator=gen)
        correct = seen = 0
        for s in range(steps_per_epoch):
            idx = order[s * t.batch_size:(s + 1) * t.batch_size]
            xb = _augment(x_all[idx], gen, plan.augment).to(device)
            yb = y_all[idx].to(device)
            if w_all is None:
                out = model(pixel_values=xb, labels=yb)
                loss_t, logits = out.loss, out.logits
            else:
                logits = model(pixel_values=xb).logits
                wb = w_all[idx].to(device)
                loss_t = (F.cross_entropy(logits, yb, reduction="none") * wb).sum() / wb.sum()
            opt.zero_grad(set_to_none=True)
            loss_t.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            loss = loss_t.detach().item()
            loss_ema = 0.9 * loss_ema + 0.1 * loss if (epoch or s) else loss
            correct += int((logits.argmax(-1) == yb).sum())
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_ema:.3f}", acc=f"{correct / seen:.3f}",
                            **({"val": f"{val_acc:.3f}"} if val_acc is not None else {}))
        epochs_run = epoch + 1
        if x_val is None:
            continue
        val_acc, val_balanced, val_verdict = _scores(model, x_val, y_val, t.batch_size, device, verdict_mask)
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss_ema:.3f}", acc=f"{correct / max(seen, 1):.3f}", val=f"{val_acc:.3f}")
        # balanced classes in the loss: the epoch is chosen by balanced accuracy by default (plain accuracy would
        # prefer an epoch that answers the majority label for everything)
        score = {"accuracy": val_acc, "balanced_accuracy": val_balanced,
                 "verdict_accuracy": val_verdict}[plan.select_epoch_by]
        if best is None or score > best[0]:
            best, since_best = (score, epoch + 1, copy.deepcopy(model.state_dict()), val_acc, val_balanced), 0
        elif may_stop(epoch, t.epochs):  # patience counts only the epochs of the schedule's second half
            since_best += 1
            if plan.early_stopping_patience is not None and since_best >= plan.early_stopping_patience:
                break
    bar.close()
    if best is not None:
        model.load_state_dict(best[2])
    model = model.to("cpu").eval()
    return model, TrainStats(len(x_all), epochs_run, time.perf_counter() - t0, loss_ema, correct / max(seen, 1),
                             num_validation=0 if x_val is None else len(x_val),
                             validation_accuracy=None if best is None else best[3],
                             validation_balanced_accuracy=None if best is None else best[4],
                             best_epoch=None if best is None else best[1],
                             stopped_early=epochs_run < t.epochs)
