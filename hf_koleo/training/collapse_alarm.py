"""The collapse alarm: one warning line, while training, when the prototypes or the loss say collapse.

Three signs, each with a threshold in the run's arguments (0 turns a sign off):

- ``collapse_alarm_used``: the teacher's arg-max used fewer than this share of the K prototypes
  since the last statistics step, or a single one (assignments concentrating on a few prototypes);
- ``collapse_alarm_unique_drop``: unique prototypes at the headline eps fell by more than this share
  since the last statistics step (prototypes merging);
- ``collapse_alarm_loss_margin``: after the warm-up the DINO loss is within this many nats of ln K
  (a uniform teacher: nothing is learnt, total collapse).

An alarm is a dict ``{"step", "sign", "value", "threshold", "message"}``; the trainer logs its message
as a warning, writes it to ``metrics.jsonl`` and lists every alarm in the run's summary. A sign
raises one alarm, then stays quiet until it has cleared (so a long collapse is one line, not one per
log step).
"""

from __future__ import annotations

import math
from typing import Any

USED, UNIQUE_DROP, UNIFORM_LOSS = "prototypes_used", "unique_drop", "uniform_teacher"
PREFIX = "prototypes/teacher_cls"


class CollapseAlarm:
    """Watches the statistics the trainer already computes; see the module docstring."""

    def __init__(
        self, num_prototypes: int, used: float, unique_drop: float, loss_margin: float, eps: float = 0.025
    ) -> None:
        self.num_prototypes, self.eps = num_prototypes, eps
        self.used, self.unique_drop, self.loss_margin = used, unique_drop, loss_margin
        self.alarms: list[dict[str, Any]] = []
        self._raised: set[str] = set()
        self._last_unique: int | None = None

    @classmethod
    def from_arguments(cls, arguments, num_prototypes: int) -> CollapseAlarm:
        eps = 0.025 if 0.025 in arguments.proto_eps else arguments.proto_eps[0]
        return cls(
            num_prototypes,
            arguments.collapse_alarm_used,
            arguments.collapse_alarm_unique_drop,
            arguments.collapse_alarm_loss_margin,
            eps,
        )

    def restore(self, rows: list[dict[str, Any]]) -> None:
        """Go on from a resumed run's ``metrics.jsonl`` rows: its alarms and its last unique count."""
        key, alarm_prefix = f"{PREFIX}/unique@{self.eps:g}", "collapse_alarm/"
        for row in rows:
            if key in row:
                self._last_unique = row[key]
            if f"{alarm_prefix}sign" in row:
                self.alarms.append(
                    {name[len(alarm_prefix) :]: value for name, value in row.items() if name.startswith(alarm_prefix)}
                )

    def check_prototypes(self, step: int, metrics: dict[str, Any]) -> list[dict[str, Any]]:
        """The prototype signs, from one :func:`hf_koleo.prototypes.prototype_metrics` row."""
        raised = []
        used = metrics.get(f"{PREFIX}/used")
        if self.used > 0 and used is not None:
            share = used / self.num_prototypes
            raised += self._sign(
                USED,
                step,
                share < self.used or used <= 1,  # one prototype for every image: collapse at any K
                share,
                self.used,
                f"the teacher's arg-max used {used:,} of {self.num_prototypes:,} prototypes "
                f"({share:.2%} < collapse_alarm_used {self.used:.2%}): assignments are concentrating",
            )
        unique = metrics.get(f"{PREFIX}/unique@{self.eps:g}")
        if unique is not None:
            if self.unique_drop > 0 and self._last_unique:
                drop = 1.0 - unique / self._last_unique
                raised += self._sign(
                    UNIQUE_DROP,
                    step,
                    drop > self.unique_drop,
                    drop,
                    self.unique_drop,
                    f"unique prototypes at eps {self.eps:g} fell from {self._last_unique:,} to {unique:,} "
                    f"({drop:.1%} > collapse_alarm_unique_drop {self.unique_drop:.0%}): prototypes are merging",
                )
            self._last_unique = unique
        return raised

    def check_loss(self, step: int, dino_loss: float, after_warmup: bool) -> list[dict[str, Any]]:
        """The uniform-teacher sign, from a logged DINO loss (only once the warm-up is over)."""
        if self.loss_margin <= 0 or not after_warmup or not math.isfinite(dino_loss):
            return []
        gap = abs(math.log(self.num_prototypes) - dino_loss)
        return self._sign(
            UNIFORM_LOSS,
            step,
            gap < self.loss_margin,
            dino_loss,
            self.loss_margin,
            f"the DINO loss {dino_loss:.4f} sits at ln K = {math.log(self.num_prototypes):.4f} "
            f"(within collapse_alarm_loss_margin {self.loss_margin:g}): the teacher is uniform, total collapse",
        )

    def _sign(self, sign: str, step: int, on: bool, value: float, threshold: float, text: str) -> list[dict]:
        if not on:
            self._raised.discard(sign)
            return []
        if sign in self._raised:
            return []
        self._raised.add(sign)
        alarm = {"step": step, "sign": sign, "value": value, "threshold": threshold, "message": f"step {step}: {text}"}
        self.alarms.append(alarm)
        return [alarm]


__all__ = ["CollapseAlarm", "UNIFORM_LOSS", "UNIQUE_DROP", "USED"]
