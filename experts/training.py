"""Training one image classifier on CPU (or CUDA) from in-memory uint8 images. Deterministic for a seed."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm
from transformers import PreTrainedModel

from expertmesh.experts.models import build_model
from expertmesh.experts.preprocess import to_pixel_values
from expertmesh.experts.spec import ExpertSpec, TrainingSpec


@dataclass(frozen=True)
class TrainStats:
    num_images: int
    epochs: int
    seconds: float
    final_loss: float
    train_accuracy: float


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Label-preserving for every pcb-aoi task: quarter turns and flips of the whole scene."""
    k = int(torch.randint(0, 4, (1,), generator=gen))
    x = torch.rot90(x, k, dims=(2, 3))
    if bool(torch.randint(0, 2, (1,), generator=gen)):
        x = torch.flip(x, dims=(3,))
    return x


def train_classifier(expert: ExpertSpec, images: np.ndarray, labels: np.ndarray, *, seed: int,
                     training: TrainingSpec | None = None, device: str = "cpu",
                     progress: bool = True) -> tuple[PreTrainedModel, TrainStats]:
    """Train a fresh model for `expert` on uint8 images [N, H, W, 3] and integer labels [N]."""
    t = training or expert.training
    t0 = time.perf_counter()
    x_all = to_pixel_values(images, expert.input_size_px)
    y_all = torch.from_numpy(labels)
    model = build_model(expert, seed).to(device).train()
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = max(1, (len(x_all) + t.batch_size - 1) // t.batch_size)
    opt = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=t.learning_rate, total_steps=t.epochs * steps_per_epoch,
                                                pct_start=0.15)
    loss_ema, correct, seen = 0.0, 0, 0
    bar = tqdm(total=t.epochs * steps_per_epoch, desc=f"train {expert.name}", unit="step", disable=not progress, leave=False)
    for epoch in range(t.epochs):
        order = torch.randperm(len(x_all), generator=gen)
        correct = seen = 0
        for s in range(steps_per_epoch):
            idx = order[s * t.batch_size:(s + 1) * t.batch_size]
            xb = _augment(x_all[idx], gen).to(device)
            yb = y_all[idx].to(device)
            out = model(pixel_values=xb, labels=yb)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            opt.step()
            sched.step()
            loss = out.loss.detach().item()
            loss_ema = 0.9 * loss_ema + 0.1 * loss if (epoch or s) else loss
            correct += int((out.logits.argmax(-1) == yb).sum())
            seen += len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss_ema:.3f}", acc=f"{correct / seen:.3f}")
    bar.close()
    model = model.to("cpu").eval()
    return model, TrainStats(len(x_all), t.epochs, time.perf_counter() - t0, loss_ema, correct / max(seen, 1))
