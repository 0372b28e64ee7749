"""Optimisation: AdamW parameter groups, the DINO schedules (lr, weight decay, teacher momentum and
temperature) as pure functions of the step, and the two optimiser tricks of the step (skip an update
on the device, freeze the last layer early)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..modeling_koleo_dino import KoLeoDinoForPreTraining
from .arguments import PretrainingArguments


def cosine_schedule(
    step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0, warmup_start: float = 0.0
) -> float:
    """Linear warm-up from ``warmup_start`` to ``start`` over ``warmup_steps``, then cosine to ``end``.

    The cosine reaches ``end`` at ``total_steps - 1`` and stays there afterwards.
    """
    if step < warmup_steps:
        return warmup_start + (start - warmup_start) * step / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * progress))


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``start`` to ``end`` linearly over ``warmup_steps``, then ``end`` (teacher temperature)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / warmup_steps


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
