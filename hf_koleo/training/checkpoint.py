"""Atomic checkpoints: save into a temporary folder, then rename; keep the last N; resume from the newest that loads."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d{8})$")
STATE_FILE = "trainer_state.json"
# torch.save reports a full disk as a bare RuntimeError, so a failed save also looks at the free space.
DISK_FULL_BYTES = 1 << 20


class CheckpointSaveError(OSError):
    """A checkpoint could not be written; its temporary folder was removed, earlier checkpoints are intact."""


class CheckpointLoadError(RuntimeError):
    """No checkpoint asked for by ``--resume`` could be loaded."""


class CheckpointConfigError(ValueError):
    """The checkpoint ``--resume`` chose was saved with another model config than this run's."""


# Config entries that say how a config was saved, not what the model is.
_CONFIG_BOOKKEEPING = {"_name_or_path", "architectures", "dtype", "torch_dtype", "transformers_version"}


@dataclass
class TrainerState:
    """What the loop needs besides model, optimiser and RNG to continue exactly."""

    step: int = 0
    # Data position: resident [epoch, batch_index]; streamed [0, batches delivered] (+ each worker's records read).
    position: list[int] = field(default_factory=lambda: [0, 0])
    images_seen: int = 0
    corrupt_records: int = 0
    global_batch_size: int = 0  # images per step over all processes (0: a checkpoint from before it was saved)
    per_device_batch_size: int = 0  # images per process and data batch (0: not saved)
    # Each process's own data position and corrupt-record count, by rank (filled when saving): a
    # streamed position differs between processes, which read different shards.
    per_process: list[dict] = field(default_factory=list)

    @property
    def saved_num_processes(self) -> int:
        """How many processes the saved run had (0 when the checkpoint does not say)."""
        return len(self.per_process)


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
    candidates = _resume_candidates(output_dir, resume)
    return candidates[0] if candidates else None


def _resume_candidates(output_dir: str | os.PathLike, resume: str) -> list[Path]:
    """The folders ``--resume`` may load, preferred first: newest first for ``"latest"``."""
    if not resume:
        return []
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("--resume latest: no checkpoint in %s, starting from scratch", checkpoint_dir(output_dir))
        return checkpoints[::-1]
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"--resume {resume}: not a complete checkpoint (no {STATE_FILE})")
    return [path]


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``"key: saved -> current"`` for every model-config entry that differs (nested configs dotted)."""
    differences = []
    for key in sorted(set(saved) | set(current), key=str):
        if key in _CONFIG_BOOKKEEPING:
            continue
        old, new = saved.get(key), current.get(key)
        if isinstance(old, dict) and isinstance(new, dict):
            differences += config_differences(old, new, f"{prefix}{key}.")
        elif old != new and not (isinstance(old, (list, tuple)) and list(old) == list(new or [])):
            differences.append(f"{prefix}{key}: {old!r} -> {new!r}")
    return differences


def check_same_model_config(path: Path, model_config) -> None:
    """Raise ``CheckpointConfigError`` naming each field where ``path``'s config differs from ``model_config``.

    A checkpoint without a readable ``config.json`` is left to the load (it is damaged, not different).
    """
    try:
        saved = type(model_config).from_pretrained(path).to_dict()
    except Exception:  # missing or damaged config.json: load_checkpoint reports it
        return
    differences = config_differences(saved, model_config.to_dict())
    if differences:
        raise CheckpointConfigError(
            f"--resume: checkpoint {path} was saved with another model config than this run's "
            f"({'; '.join(differences)}, checkpoint -> now): resume with the run's original model settings, "
            "or start a new run in another --output_dir"
        )


def load_resume_checkpoint(
    accelerator: Accelerator, output_dir: str | os.PathLike, resume: str, model_config=None
) -> tuple[TrainerState, Path | None]:
    """Restore what ``--resume`` asks for; returns the trainer state and the folder it came from.

    With ``"latest"``, a checkpoint that does not load (truncated or missing files) is skipped with
    a warning for the previous complete one. Every process must load the same folder, so they agree
    on each attempt. Nothing to resume gives ``(TrainerState(), None)``; nothing loadable raises
    ``CheckpointLoadError`` with each folder's reason. A checkpoint saved with another model config
    than ``model_config`` raises ``CheckpointConfigError`` naming the fields that differ.
    """
    failures: list[str] = []
    candidates = _resume_candidates(output_dir, resume)
    for index, path in enumerate(candidates):
        if model_config is not None:
            check_same_model_config(path, model_config)
        error = None
        try:
            state = load_checkpoint(accelerator, path)
        except Exception as caught:  # a damaged file fails in many ways (safetensors, pickle, json, missing file)
            error = caught
        else:
            take_own_position(state, accelerator.process_index, accelerator.num_processes)
        if _everyone_succeeded(accelerator, error is None):
            if failures and accelerator.is_main_process:
                logger.warning("--resume: fell back to %s, the newer checkpoint could not be loaded", path)
            return state, path
        reason = _one_line(error) if error is not None else "another process could not load it"
        failures.append(f"{path}: {reason}")
        if accelerator.is_main_process and index + 1 < len(candidates):
            logger.warning("--resume: checkpoint %s cannot be loaded (%s); trying the previous one", path, reason)
    if failures:
        raise CheckpointLoadError(f"--resume {resume}: no checkpoint could be loaded ({'; '.join(failures)})")
    return TrainerState(), None


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
    is given. A failed write (a full disk, say) removes the temporary folder and raises
    ``CheckpointSaveError`` on every process.
    """
    per_process = gather_object([{"position": list(state.position), "corrupt_records": state.corrupt_records}])
    folder = checkpoint_dir(output_dir)
    final = folder / (name or f"checkpoint-{state.step:08d}")
    staging = folder / f".tmp-{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    accelerator.wait_for_everyone()
    error = None
    try:
        accelerator.save_state(str(staging), safe_serialization=True)
        if accelerator.is_main_process:
            model_config.save_pretrained(staging)
            if image_processor is not None:
                image_processor.save_pretrained(staging)
            if run_arguments is not None:
                (staging / "run_arguments.json").write_text(json.dumps(run_arguments, indent=2))
            saved = replace(state, per_process=per_process)
            (staging / STATE_FILE).write_text(json.dumps(asdict(saved), indent=2))
    except Exception as caught:  # torch.save raises RuntimeError, safetensors its own type, on a failed write
        error = caught
    # Each process writes its own RNG state: the rename waits until all of them are done.
    if not _everyone_succeeded(accelerator, error is None):
        disk_full = error is not None and _is_disk_full(error, folder)
        if accelerator.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise _save_error(final, staging, error, disk_full) from error
    if accelerator.is_main_process:
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
    if not any((Path(path) / name).exists() for name in ("model.safetensors", "pytorch_model.bin")):
        raise FileNotFoundError(f"{path} holds no model weights (model.safetensors is missing)")
    accelerator.load_state(str(path))
    return TrainerState(**json.loads((Path(path) / STATE_FILE).read_text()))


def take_own_position(state: TrainerState, rank: int, world_size: int) -> None:
    """Give this process its own data position and corrupt-record count from ``state.per_process``.

    The same number of processes as the saved run: each takes its own entry (exact). Another
    number: shards are dealt out anew, so the per-worker record counts of the main process's
    position mean nothing here; every process goes on at its batch count, and the main process
    carries the run's corrupt-record total.
    """
    if not state.per_process:
        return  # a checkpoint from before positions were saved per process: the main process's, as it was
    if len(state.per_process) == world_size:
        own = state.per_process[rank]
        state.position, state.corrupt_records = list(own["position"]), int(own["corrupt_records"])
        return
    state.position = list(state.position[:2])
    total = sum(int(entry["corrupt_records"]) for entry in state.per_process)
    state.corrupt_records = total if rank == 0 else 0


def _everyone_succeeded(accelerator: Accelerator, succeeded: bool) -> bool:
    """True when every process succeeded; also a barrier (a sync point, only at checkpoint time)."""
    flags = accelerator.gather(torch.tensor([int(succeeded)], device=accelerator.device))
    return bool(flags.all())


def _is_disk_full(error: BaseException, folder: Path) -> bool:
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(folder).free < DISK_FULL_BYTES
    except OSError:
        return False


def _save_error(final: Path, staging: Path, error: BaseException | None, disk_full: bool) -> CheckpointSaveError:
    kept = "the partial folder was removed and earlier checkpoints are kept"
    if error is None:
        return CheckpointSaveError(f"checkpoint {final}: another process failed writing {staging}; {kept}")
    if disk_full:
        return CheckpointSaveError(
            errno.ENOSPC,
            f"checkpoint {final}: the disk is full (writing {staging} failed: {_one_line(error)}); {kept}. "
            "Free some space (or lower --keep_last) and continue with --resume",
        )
    return CheckpointSaveError(f"checkpoint {final}: writing {staging} failed ({_one_line(error)}); {kept}")


def _one_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
