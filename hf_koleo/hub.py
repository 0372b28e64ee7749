"""Export the teacher backbone as a stock transformers checkpoint, write its model card, push it.

Data flow: pretraining checkpoint -> :func:`export_checkpoint` (stock ``Dinov2Model`` /
``ViTModel`` + image processor, optionally the full pretraining model with ``auto_map``) ->
:func:`write_model_card` (metadata, ``model-index`` from evaluation JSON files, prototype
statistics, plot) -> :func:`push_folder` (``create_repo`` + ``upload_folder``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from .backbone_export import check_weight_files, export_backbone
from .modeling_koleo_dino import KoLeoDinoForPreTraining
from .prototypes import prototype_report
from .training.checkpoint import list_checkpoints

logger = logging.getLogger(__name__)

REMOTE_CODE_FILES = ("configuration_koleo_dino.py", "modeling_koleo_dino.py", "losses.py", "koleo_neighbours.py")
RUN_ARGUMENTS_FILE = "run_arguments.json"
REPORT_FILE = "prototype_report.json"
# What an export folder holds: a previous export may be replaced, any other content is refused.
EXPORT_NAMES = frozenset(
    {
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "preprocessor_config.json",
        "README.md",
        "prototype_collapse.png",
        "pretraining",
        RUN_ARGUMENTS_FILE,
        REPORT_FILE,
    }
)
DEFAULT_HUB_TIMEOUT = 60.0


def _is_latest_checkpoint(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` is the newest complete checkpoint of its run (whose final report it matches)."""
    checkpoints = list_checkpoints(checkpoint.parent.parent)
    return bool(checkpoints) and checkpoints[-1].resolve() == checkpoint.resolve()


def load_pretraining_model(path: str | os.PathLike, allow_pickle: bool = False) -> KoLeoDinoForPreTraining:
    """Load a pretraining checkpoint from safetensors; a pickle-only checkpoint needs ``allow_pickle``."""
    has_safetensors = check_weight_files(path, allow_pickle)
    return KoLeoDinoForPreTraining.from_pretrained(Path(path), use_safetensors=has_safetensors)


def export_pretraining_model(model: KoLeoDinoForPreTraining, output_dir: str | os.PathLike) -> Path:
    """The full model (student, teacher, heads, prototypes, centres) with code for ``trust_remote_code``."""
    output_dir = Path(output_dir)
    model.config.auto_map = {
        "AutoConfig": "configuration_koleo_dino.KoLeoDinoConfig",
        "AutoModel": "modeling_koleo_dino.KoLeoDinoModel",
        "AutoModelForPreTraining": "modeling_koleo_dino.KoLeoDinoForPreTraining",
    }
    model.save_pretrained(output_dir, safe_serialization=True)
    for name in REMOTE_CODE_FILES:
        shutil.copy(Path(__file__).parent / name, output_dir / name)
    return output_dir


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    include_pretraining_model: bool = False,
    allow_pickle: bool = False,
    model: KoLeoDinoForPreTraining | None = None,
) -> Path:
    """Export a pretraining checkpoint folder (as written by the trainer) for the Hub.

    The image size and normalisation come from the checkpoint's ``preprocessor_config.json``.
    Copies ``run_arguments.json`` for the card, and the run's ``prototype_report.json`` when the
    checkpoint is the run's last one (else computes the report of this checkpoint, without images).
    """
    from transformers import AutoImageProcessor

    checkpoint = Path(checkpoint)
    model = model or load_pretraining_model(checkpoint, allow_pickle)
    try:
        processor = AutoImageProcessor.from_pretrained(checkpoint)
        size = (
            processor.crop_size["height"] if getattr(processor, "do_center_crop", False) else processor.size["height"]
        )
        mean, std = processor.image_mean, processor.image_std
    except OSError:
        logger.warning(
            "%s has no preprocessor_config.json: using the backbone image size and ImageNet stats", checkpoint
        )
        size, mean, std = model.config.backbone_config.image_size, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    output_dir = export_backbone(model, output_dir, size, mean, std)
    for candidate in (checkpoint / RUN_ARGUMENTS_FILE, checkpoint.parent.parent / RUN_ARGUMENTS_FILE):
        if candidate.exists():  # the run's settings hold for each of its checkpoints
            shutil.copy(candidate, output_dir / RUN_ARGUMENTS_FILE)
            break
    run_report = checkpoint.parent.parent / REPORT_FILE
    if _is_latest_checkpoint(checkpoint) and run_report.exists():
        shutil.copy(run_report, output_dir / REPORT_FILE)  # written for this final model, with utilisation
    else:  # an earlier checkpoint: the run's final report would describe another model
        (output_dir / REPORT_FILE).write_text(json.dumps(prototype_report(model), indent=2))
    if include_pretraining_model:
        export_pretraining_model(model, output_dir / "pretraining")
    return output_dir


class HubUnreachableError(ConnectionError):
    """The Hub endpoint refused the connection, or accepted it and did not answer in time."""


@contextlib.contextmanager
def hub_request_timeout(seconds: float):
    """Give every huggingface_hub request that sets no timeout of its own (``create_repo``, commits) one.

    huggingface_hub shares one ``httpx`` client (``get_session()``) built with ``timeout=None``; only
    downloads pass ``HF_HUB_ETAG_TIMEOUT`` / ``HF_HUB_DOWNLOAD_TIMEOUT`` per request. The timeout
    bounds each wait (connect, each read or write), not the whole transfer.
    """
    from huggingface_hub import get_session

    session = get_session()
    previous = session.timeout
    session.timeout = seconds
    try:
        yield
    finally:
        session.timeout = previous


@contextlib.contextmanager
def naming_the_endpoint(endpoint: str, timeout: float):
    """Turn a refused connection or an endpoint that never answers into one error naming it."""
    import httpx2

    try:
        yield
    except httpx2.TimeoutException as error:
        raise HubUnreachableError(
            f"the Hub at {endpoint} (HF_ENDPOINT) did not answer within {timeout:g} s "
            f"({type(error).__name__}); check the endpoint or raise --timeout"
        ) from error
    except httpx2.TransportError as error:
        raise HubUnreachableError(
            f"cannot reach the Hub at {endpoint} (HF_ENDPOINT): {type(error).__name__}: {error}"
        ) from error


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload hf_koleo backbone",
    token: str | None = None,
    timeout: float = DEFAULT_HUB_TIMEOUT,
    endpoint: str | None = None,
) -> str:
    """``create_repo`` (existing is fine) + ``upload_folder``; honours ``HF_TOKEN`` and ``HF_ENDPOINT``.

    Args:
        timeout: seconds any single request may wait on the Hub before giving up.
        endpoint: the Hub URL (default ``HF_ENDPOINT`` or huggingface.co).

    Returns the commit URL. Raises :class:`HubUnreachableError` naming the endpoint when it refuses
    the connection or stays silent for ``timeout`` seconds.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token, endpoint=endpoint)
    with naming_the_endpoint(api.endpoint, timeout), hub_request_timeout(timeout):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder), repo_id=repo_id, revision=revision, commit_message=commit_message
        )
    return str(commit)


def check_export_destination(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike, option: str = "--output"
) -> None:
    """Refuse an output that is, lies inside or contains the checkpoint, or holds other files.

    Raises before anything is written: an export replaces its output folder as a whole. ``option``
    is the command-line option that named ``output_dir`` (``--dry-run`` for a push's preview).
    """
    checkpoint, output = Path(checkpoint).resolve(), Path(output_dir).resolve()
    if output == checkpoint or checkpoint in output.parents or output in checkpoint.parents:
        relation = "is" if output == checkpoint else "is inside" if checkpoint in output.parents else "contains"
        raise ValueError(
            f"{option} {output_dir} {relation} the checkpoint folder {checkpoint}; "
            "export to a separate folder, or the checkpoint would be overwritten"
        )
    if output.is_file():
        raise ValueError(f"{option} {output_dir} is a file; give a folder to export into")
    if output.is_dir():
        foreign = sorted(
            path.name
            for path in output.iterdir()
            if path.name not in EXPORT_NAMES and not path.name.endswith(".safetensors")  # shards
        )
        if foreign:
            raise ValueError(
                f"{option} {output_dir} already holds files that are not an export ({', '.join(foreign[:5])}); "
                "choose a new or empty folder (a previous export is replaced)"
            )


@contextlib.contextmanager
def staged_folder(output_dir: str | os.PathLike):
    """Yield a staging folder beside ``output_dir`` that replaces it only when the block succeeds."""
    output = Path(output_dir)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.with_name(f".tmp-{output.name}-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    previous = output.with_name(f".old-{output.name}-{os.getpid()}")
    if output.exists():
        os.replace(output, previous)
    os.replace(staging, output)
    shutil.rmtree(previous, ignore_errors=True)


def prepare_upload_folder(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_id: str,
    evaluation_files=(),
    include_pretraining_model: bool = False,
    allow_pickle: bool = False,
    license: str = "apache-2.0",
    project_url: str | None = None,
    output_option: str = "--output",
) -> Path:
    """Export + model card: the exact folder that gets uploaded.

    Everything is checked (destination, checkpoint weights, evaluation files) before anything is
    written, and the folder is built beside ``output_dir`` and renamed into place: a failure
    leaves no half-written export, and a previous export at ``output_dir`` is replaced whole.
    Errors about ``output_dir`` name it as ``output_option`` (the script's option for it).
    """
    from .model_card import build_model_card, read_evaluation_files

    check_export_destination(checkpoint, output_dir, output_option)
    evaluations = read_evaluation_files(evaluation_files)
    model = load_pretraining_model(checkpoint, allow_pickle)
    with staged_folder(output_dir) as staging:
        export_checkpoint(checkpoint, staging, include_pretraining_model, allow_pickle, model)
        optional = {
            name: json.loads((staging / name).read_text()) if (staging / name).exists() else None
            for name in (RUN_ARGUMENTS_FILE, REPORT_FILE)
        }
        build_model_card(
            staging,
            model_id,
            model,
            optional[REPORT_FILE],
            optional[RUN_ARGUMENTS_FILE],
            evaluations,
            license,
            project_url=project_url,
        )
    return Path(output_dir)
