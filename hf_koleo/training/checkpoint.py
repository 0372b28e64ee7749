"""Atomic checkpoints: save into a temporary folder, then rename; keep the last N."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from accelerate import Accelerator

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{8})$")
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What the loop needs besides model, optimiser and RNG to continue exactly."""

    step: int = 0
    position: list[int] = field(default_factory=lambda: [0, 0])  # stream (epoch, batch_index)
    images_seen: int = 0
    corrupt_records: int = 0


def checkpoint_dir(output_dir: str | os.PathLike) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    folder = checkpoint_dir(output_dir)
    if not folder.is_dir():
        return []
    found = [path for path in folder.iterdir() if CHECKPOINT_PATTERN.match(path.name) and (path / STATE_FILE).exists()]
    return sorted(found, key=lambda path: int(CHECKPOINT_PATTERN.match(path.name).group(1)))


def resolve_resume(output_dir: str | os.PathLike, resume: str) -> Path | None:
    """``"latest"`` -> the newest complete checkpoint (None if there is none); else the given folder."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("--resume latest: no checkpoint in %s, starting from scratch", checkpoint_dir(output_dir))
            return None
        return checkpoints[-1]
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE})")
    return path


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    state: TrainerState,
    model_config,
    keep_last: int,
    name: str | None = None,
    image_processor=None,
    run_arguments: dict | None = None,
) -> Path:
    """Save model, optimiser, RNG states, trainer state and model config; atomically.

    Every process takes part (Accelerate writes per-process RNG states). The folder is loadable
    with ``KoLeoDinoForPreTraining.from_pretrained`` (``model.safetensors`` + ``config.json``),
    and with ``AutoModel`` + ``AutoImageProcessor`` (teacher backbone) when ``image_processor``
    is given.
    """
    folder = checkpoint_dir(output_dir)
    final = folder / (name or f"checkpoint-{state.step:08d}")
    staging = folder / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    if accelerator.is_main_process:
        model_config.save_pretrained(staging)
        if image_processor is not None:
            image_processor.save_pretrained(staging)
        if run_arguments is not None:
            (staging / "run_arguments.json").write_text(json.dumps(run_arguments, indent=2))
        (staging / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
        if name is None:
            for old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> TrainerState:
    """Restore model, optimiser and RNG states from ``path`` and return its trainer state."""
    accelerator.load_state(str(path))
    return TrainerState(**json.loads((Path(path) / STATE_FILE).read_text()))
