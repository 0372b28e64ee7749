"""Helpers the training loop calls once per step: optimiser groups, schedules, last layer, metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..modeling_koleo_dino import KoLeoDinoForPreTraining
from ..prototypes import distance_quantiles, nearest_neighbour_distances, unique_prototype_curve, utilisation
from .arguments import PretrainingArguments
from .schedules import cosine_schedule, linear_warmup


@dataclass
class ScheduleValues:
    lr: float
    weight_decay: float
    teacher_momentum: float
    teacher_temperature: float
    freeze_last_layer_steps: int


def build_optimizer(model: KoLeoDinoForPreTraining, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (no decay on biases, norms, scales)."""
    decayed, not_decayed = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        (not_decayed if parameter.ndim <= 1 or name.endswith(".bias") else decayed).append(parameter)
    groups = [
        {"params": decayed, "weight_decay": weight_decay, "apply_weight_decay": True},
        {"params": not_decayed, "weight_decay": 0.0, "apply_weight_decay": False},
    ]
    # Fused: one kernel for every parameter, and it can skip an update on the device (found_inf).
    return torch.optim.AdamW(groups, lr=0.0, fused=True)


def skip_update_if(accelerator, optimizer, skip: torch.Tensor) -> None:
    """Make the next ``optimizer.step()`` a no-op where ``skip`` (a device bool) is True, without a sync.

    The fused AdamW reads ``found_inf`` as ``torch.amp.GradScaler`` sets it; with fp16 the
    scaler already does this from the gradients, so nothing is set.
    """
    if accelerator.scaler is None:
        inner = getattr(optimizer, "optimizer", optimizer)
        inner.found_inf = skip.float().reshape(())


class NonFiniteGuard:
    """Counts non-finite steps on the device and keeps the first offending batch; read only when logging."""

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None
        self.first_step: torch.Tensor | None = None
        self.gradient_norm: torch.Tensor | None = None
        self.batch: dict[str, torch.Tensor] = {}

    def observe(self, step: int, loss: torch.Tensor, gradient_norm: torch.Tensor | None, batch: dict) -> None:
        bad = ~torch.isfinite(loss.detach())
        if gradient_norm is not None:
            bad = bad | ~torch.isfinite(gradient_norm)
            self.gradient_norm = gradient_norm.detach()
        if self.count is None:
            self.count = torch.zeros((), dtype=torch.long, device=loss.device)
            self.first_step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.gradient_norm = torch.zeros((), device=loss.device) if gradient_norm is None else self.gradient_norm
        first = bad & (self.count == 0)
        self.count += bad.long()
        self.first_step = torch.where(first, step, self.first_step)
        for key, value in batch.items():
            if not torch.is_tensor(value) or value.device != loss.device:
                continue
            kept = self.batch.get(key)
            if kept is None:
                kept = value.detach().clone()
            elif kept.shape != value.shape:
                continue  # a streamed batch shortened by undecodable records: not captured
            self.batch[key] = torch.where(first, value.detach(), kept)

    def first_step_everywhere(self, accelerator) -> int:
        """The earliest non-finite step over all processes (a sync: call it only when stopping)."""
        steps = accelerator.gather(torch.where(self.first_step >= 0, self.first_step, 2**62).reshape(1))
        return int(steps.min())


def epochs_to_steps(epochs: float, steps_per_epoch: float, name: str) -> int:
    if epochs == 0:
        return 0
    if not steps_per_epoch:
        raise ValueError(
            f"{name} is given in epochs but the dataset size is unknown: set dataset_size, or set {name} to 0"
        )
    return int(round(epochs * steps_per_epoch))


def schedule_values(
    arguments: PretrainingArguments, step: int, total_steps: int, steps_per_epoch: float, peak_lr: float
) -> ScheduleValues:
    """Every scheduled value at ``step`` (DINO: lr warm-up + cosine, wd cosine, momentum cosine)."""
    warmup_steps = min(epochs_to_steps(arguments.warmup_epochs, steps_per_epoch, "warmup_epochs"), total_steps - 1)
    temperature_steps = epochs_to_steps(
        arguments.teacher_temperature_warmup_epochs, steps_per_epoch, "teacher_temperature_warmup_epochs"
    )
    return ScheduleValues(
        lr=cosine_schedule(step, total_steps, peak_lr, arguments.min_lr, max(0, warmup_steps)),
        weight_decay=cosine_schedule(step, total_steps, arguments.weight_decay, arguments.weight_decay_end),
        teacher_momentum=cosine_schedule(step, total_steps, arguments.teacher_momentum, arguments.teacher_momentum_end),
        teacher_temperature=linear_warmup(
            step, temperature_steps, arguments.teacher_temperature_start, arguments.teacher_temperature
        ),
        freeze_last_layer_steps=epochs_to_steps(
            arguments.freeze_last_layer_epochs, steps_per_epoch, "freeze_last_layer_epochs"
        ),
    )


def apply_schedules(optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
    for group in optimizer.param_groups:
        group["lr"] = values.lr
        if group.get("apply_weight_decay"):
            group["weight_decay"] = values.weight_decay


def cancel_last_layer_gradients(model: KoLeoDinoForPreTraining) -> None:
    """DINO freezes the prototypes early on: drop their gradients so the optimiser skips them."""
    for head in model.prototype_heads("student").values():
        head.prototypes.grad = None
        head.prototype_scale.grad = None


@torch.no_grad()
def prototype_metrics(model: KoLeoDinoForPreTraining, assignment_counts: torch.Tensor, eps_values) -> dict[str, Any]:
    """Scalars for the trackers: unique prototypes per eps, NN-distance quantiles, utilisation."""
    metrics: dict[str, Any] = {}
    for branch in ("teacher", "student"):
        for head_name, head in model.prototype_heads(branch).items():
            prefix = f"prototypes/{branch}_{head_name}"
            for eps, count in unique_prototype_curve(head.prototypes, eps_values).items():
                metrics[f"{prefix}/unique@{eps:g}"] = count
            quantiles = distance_quantiles(nearest_neighbour_distances(head.prototypes), (0.01, 0.5))
            metrics.update({f"{prefix}/nn_distance_{key}": value for key, value in quantiles.items()})
    usage = utilisation(
        torch.repeat_interleave(torch.arange(len(assignment_counts)), assignment_counts.cpu()), len(assignment_counts)
    )
    metrics.update({f"prototypes/teacher_cls/{key}": value for key, value in usage.items()})
    return metrics
