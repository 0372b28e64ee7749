"""Optimisation: AdamW parameter groups, the DINO schedules (lr, weight decay, teacher momentum and
temperature, the last layer's lr) as pure functions of the step, and skipping an update on the device.

The last layer (the student's prototypes and their scale) is frozen early on as DINOv2 does it:
its parameter groups say ``is_last_layer`` and get ``last_layer_lr``, 0 for the first
``freeze_last_layer_epochs``; nothing touches the gradients."""

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
    last_layer_lr: float  # the prototypes' lr: 0 while the last layer is frozen, else lr


def last_layer_parameters(model: KoLeoDinoForPreTraining) -> set[int]:
    """``id`` of the student's prototype parameters (prototypes and scale of each head)."""
    heads = model.prototype_heads("student").values()
    return {id(parameter) for head in heads for parameter in (head.prototypes, head.prototype_scale)}


def build_optimizer(model: KoLeoDinoForPreTraining, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (no decay on biases, norms, scales); the last
    layer in groups of its own (``is_last_layer``), so it can be frozen by its lr."""
    last_layer = last_layer_parameters(model)
    groups: dict[tuple[bool, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        decayed = not (parameter.ndim <= 1 or name.endswith(".bias"))
        groups.setdefault((decayed, id(parameter) in last_layer), []).append(parameter)
    param_groups = [
        {
            "params": parameters,
            "weight_decay": weight_decay if decayed else 0.0,
            "apply_weight_decay": decayed,
            "is_last_layer": is_last_layer,
        }
        for (decayed, is_last_layer), parameters in sorted(
            groups.items(), key=lambda item: (not item[0][0], item[0][1])
        )
    ]
    # Fused: one kernel for every parameter, and it can skip an update on the device (found_inf).
    return torch.optim.AdamW(param_groups, lr=0.0, fused=True)


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
    freeze_steps = epochs_to_steps(arguments.freeze_last_layer_epochs, steps_per_epoch, "freeze_last_layer_epochs")
    lr = cosine_schedule(step, total_steps, peak_lr, arguments.min_lr, max(0, warmup_steps))
    return ScheduleValues(
        lr=lr,
        weight_decay=cosine_schedule(step, total_steps, arguments.weight_decay, arguments.weight_decay_end),
        teacher_momentum=cosine_schedule(step, total_steps, arguments.teacher_momentum, arguments.teacher_momentum_end),
        teacher_temperature=linear_warmup(
            step, temperature_steps, arguments.teacher_temperature_start, arguments.teacher_temperature
        ),
        last_layer_lr=0.0 if step < freeze_steps else lr,
    )


def apply_schedules(optimizer: torch.optim.Optimizer, values: ScheduleValues) -> None:
    """The step's lr (``last_layer_lr`` for the last layer's groups) and weight decay, group by group."""
    for group in optimizer.param_groups:
        group["lr"] = values.last_layer_lr if group.get("is_last_layer") else values.lr
        if group.get("apply_weight_decay"):
            group["weight_decay"] = values.weight_decay
