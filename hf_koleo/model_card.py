"""Model cards for exported backbones: metadata, model-index, training setup, collapse statistics, plot."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from pathlib import Path
from typing import Any

from .data.sources import EMBEDDED, looks_like_path
from .prototypes import DEFAULT_EPS_VALUES, nearest_neighbour_distances, unique_prototype_curve

TEMPLATE = Path(__file__).parent / "model_cards" / "koleo_backbone.md"
PLOT_FILE = "prototype_collapse.png"
FASHION_MNIST_HUB_ID = "zalando-datasets/fashion_mnist"
EVAL_RESULT_KEYS = ("task_type", "dataset_type", "dataset_name", "metric_type", "metric_name", "metric_value")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
TRAINING_KEYS = (
    "data",
    "max_steps",
    "epochs",
    "per_device_batch_size",
    "gradient_accumulation_steps",
    "base_lr",
    "global_crops_size",
    "local_crops_number",
    "local_crops_size",
    "teacher_temperature",
    "teacher_momentum",
    "mixed_precision",
)
MODEL_KEYS = (
    "num_prototypes",
    "koleo_proto_weight",
    "koleo_proto_on",
    "ibot_loss_weight",
    "centring",
    "student_temperature",
    "head_bottleneck_size",
)


def usage_snippet(model_id: str) -> str:
    return (
        "import torch\n"
        "from PIL import Image\n"
        "from transformers import AutoImageProcessor, AutoModel, pipeline\n\n"
        f'processor = AutoImageProcessor.from_pretrained("{model_id}")\n'
        f'model = AutoModel.from_pretrained("{model_id}").eval()\n'
        'image = Image.new("RGB", (64, 64), (120, 60, 200))  # your image here\n'
        "with torch.no_grad():\n"
        '    features = model(**processor(images=image, return_tensors="pt")).pooler_output  # CLS feature\n'
        "print(features.shape)\n"
        f'extractor = pipeline("image-feature-extraction", model="{model_id}")\n'
        "print(len(extractor(image)[0]))  # tokens"
    )


def _format_baseline(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot_prototypes(model, output_path: str | os.PathLike, eps_values, curves: dict | None = None) -> Path:
    """Unique prototypes vs eps (teacher and student) and the teacher's nearest-neighbour distances.

    ``curves`` (``{branch: {eps: count}}``, e.g. from the model's prototype report) spares recomputing them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curve_axis, histogram_axis) = plt.subplots(1, 2, figsize=(10, 3.8))
    for branch, style in (("teacher", "-o"), ("student", "--s")):
        curve = (curves or {}).get(branch) or unique_prototype_curve(
            getattr(model, f"{branch}_head").prototypes, eps_values
        )
        curve_axis.plot(list(curve), list(curve.values()), style, label=branch)
    curve_axis.axhline(model.config.num_prototypes, color="grey", linewidth=0.8, linestyle=":", label="K")
    curve_axis.set(
        xscale="log",
        xlabel="eps",
        ylabel="unique prototypes",
        title="Unique prototypes vs eps",
        ylim=(0, model.config.num_prototypes * 1.05),
    )
    curve_axis.legend()
    distances = nearest_neighbour_distances(model.teacher_head.prototypes).cpu().numpy()
    histogram_axis.hist(distances, bins=50, color="tab:blue")
    histogram_axis.axvline(0.025, color="tab:red", linestyle="--", label="eps = 0.025")
    histogram_axis.set(
        xlabel="distance to nearest other prototype", ylabel="prototypes", title="Teacher nearest-neighbour distances"
    )
    histogram_axis.legend()
    figure.tight_layout()
    figure.savefig(output_path, dpi=110)
    plt.close(figure)
    return Path(output_path)


def read_evaluation_files(paths) -> list[dict[str, Any]]:
    """The result records of ``scripts/evaluate.py`` JSON files, each checked to hold a usable ``model_index``.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is not JSON or not an evaluation result, or was computed on unlabelled
            data (label -1); the message names the file.
    """
    records = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation results file {path} not found")
        try:
            record = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"evaluation results file {path} is not valid JSON: {error}") from None
        entries = record.get("model_index") if isinstance(record, dict) else None
        if not isinstance(record, dict) or not isinstance(record.get("model"), str) or not isinstance(entries, list):
            raise ValueError(
                f"evaluation results file {path} is not a scripts/evaluate.py result (needs 'model' and 'model_index')"
            )
        for entry in entries:
            missing = [key for key in EVAL_RESULT_KEYS if not isinstance(entry, dict) or key not in entry]
            if missing:
                raise ValueError(f"evaluation results file {path}: a model_index entry lacks {missing}")
        if _scored_against_unknown_labels(record.get("protocols")):
            data = record.get("data") if isinstance(record.get("data"), dict) else {}
            raise ValueError(
                f"evaluation results file {path} was computed on data with no labels "
                f"(test {data.get('test', '?')!r}, train {data.get('train', '?')!r}: label -1); "
                "its accuracies mean nothing, evaluate on labelled data"
            )
        records.append(record)
    return records


def _scored_against_unknown_labels(protocols: Any) -> bool:
    """Whether a result's per-class accuracies include the unknown label -1 (written before evaluation refused it)."""
    if isinstance(protocols, dict):
        per_class = protocols.get("per_class_accuracy")
        if isinstance(per_class, dict) and "-1" in per_class:
            return True
        return any(_scored_against_unknown_labels(value) for value in protocols.values())
    return False


def _eval_results(evaluations) -> tuple[list, dict]:
    """``EvalResult``s of the model itself, and ``{(dataset, metric): value}`` of the pixel baseline."""
    from huggingface_hub import EvalResult

    results, baseline = [], {}
    for record in evaluations:
        for entry in record["model_index"]:
            if record["model"] == "pixels":
                baseline[(entry["dataset_name"], entry["metric_name"])] = entry["metric_value"]
            else:  # the Hub reads dataset.type as a dataset id
                dataset_id = hub_dataset_id(entry["dataset_type"]) or entry["dataset_type"]
                results.append(EvalResult(**{**entry, "dataset_type": dataset_id}))
    return results, baseline


def hub_dataset_id(source: str) -> str | None:
    """The Hub dataset id of a data source name, or None for a local path (not on the Hub).

    The built-in Fashion-MNIST sources (``demo``, ``fashion_mnist:*``) are Fashion-MNIST's Hub id;
    ``owner/name[:split]`` is ``owner/name``.
    """
    if not source:
        return None
    if source in EMBEDDED or source.startswith("fashion_mnist:"):
        return FASHION_MNIST_HUB_ID
    stem = source.partition(":")[0]
    if looks_like_path(source) or Path(stem).expanduser().exists() or not _HUB_ID.match(stem):
        return None
    return stem


def package_project_url() -> str | None:
    """The hf_koleo home page from the installed package's metadata (``Home-page`` / ``Project-URL``)."""
    try:
        metadata = importlib.metadata.metadata("hf_koleo")
    except importlib.metadata.PackageNotFoundError:
        return None
    urls = [metadata.get("Home-page")] + [entry.split(",", 1)[-1] for entry in metadata.get_all("Project-URL") or []]
    return next((url.strip() for url in urls if url and url.strip().startswith("https://")), None)


def build_model_card(
    output_dir: str | os.PathLike,
    model_id: str,
    model=None,
    report: dict[str, Any] | None = None,
    run_arguments: dict[str, Any] | None = None,
    evaluations=(),
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    eps_values=DEFAULT_EPS_VALUES,
    project_url: str | None = None,
):
    """Render the card (and the plot, when the pretraining ``model`` is given) into ``output_dir``.

    Args:
        output_dir: the exported backbone folder; ``README.md`` and the PNG are written there.
        model_id: the repo id (or path) the usage snippet loads.
        model: the :class:`KoLeoDinoForPreTraining`, for the prototype plot.
        report: a :func:`prototype_report` dict (``prototype_report.json``).
        run_arguments: the run's ``PretrainingArguments`` as a dict.
        evaluations: result records of ``scripts/evaluate.py`` (see :func:`read_evaluation_files`);
            the model's become ``model-index``, those of ``--model pixels`` the baseline column.
        datasets: Hub dataset ids for the metadata (default: the run's ``data`` when it has one).
        project_url: where the card links hf_koleo (default: the package metadata; no link if unset).
    """
    from huggingface_hub import ModelCard, ModelCardData

    output_dir = Path(output_dir)
    backbone_config = json.loads((output_dir / "config.json").read_text())
    run_arguments = run_arguments or {}
    report = report or {}
    model_config = model.config.to_dict() if model is not None else {}
    eval_results, baseline = _eval_results(evaluations)
    trained_on = hub_dataset_id(run_arguments.get("data", ""))  # None for a local path
    uses_ibot = model_config.get("ibot_loss_weight", 0) > 0
    uses_koleo_proto = model_config.get("koleo_proto_weight", 0) > 0
    method = ("iBOT" if uses_ibot else "DINO") + (" + KoLeo-proto" if uses_koleo_proto else "")
    tags = ["self-supervised", "vision", "image-feature-extraction", "dino", "hf_koleo"]
    tags += ["ibot"] * uses_ibot + ["koleo-proto"] * uses_koleo_proto
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-feature-extraction",
        license=license,
        tags=tags,
        datasets=datasets or ([trained_on] if trained_on else None),
        model_name=model_id.rstrip("/").split("/")[-1],
        eval_results=eval_results or None,
    )
    training_rows = [(key, run_arguments[key]) for key in TRAINING_KEYS if key in run_arguments]
    training_rows += [(f"model.{key}", model_config[key]) for key in MODEL_KEYS if key in model_config]
    teacher, student = report.get("teacher/cls", {}), report.get("student/cls", {})
    unique_rows = [
        (eps, teacher.get("unique_curve", {}).get(eps, "-"), student.get("unique_curve", {}).get(eps, "-"))
        for eps in teacher.get("unique_curve", {})
    ]
    utilisation = None
    if "utilisation" in teacher:
        utilisation = {
            "images": report.get("config", {}).get("n_images", "the report's"),
            "used": teacher["utilisation"]["used"],
            "perplexity": f"{teacher['utilisation']['assignment_perplexity']:.1f}",
            "entropy": f"{teacher['marginal_entropy']:.2f}",
            "max_entropy": f"{teacher['max_marginal_entropy']:.2f}",
        }
    plot_file = None
    if model is not None:
        curves = {
            branch: {float(eps): count for eps, count in report[f"{branch}/cls"]["unique_curve"].items()}
            for branch in ("teacher", "student")
            if f"{branch}/cls" in report
        }
        plot_prototypes(model, output_dir / PLOT_FILE, eps_values, curves)
        plot_file = PLOT_FILE
    card = ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE),
        model_name=model_id.rstrip("/").split("/")[-1],
        project_url=project_url or package_project_url(),
        method=method,
        architecture=(backbone_config.get("architectures") or ["Dinov2Model"])[0],
        usage_snippet=usage_snippet(model_id),
        training_rows=training_rows,
        num_prototypes=model_config.get("num_prototypes", teacher.get("num_prototypes", "?")),
        unique_rows=unique_rows,
        utilisation=utilisation,
        plot_file=plot_file,
        eval_rows=[
            (
                r.dataset_name,
                r.metric_name,
                f"{r.metric_value:.2f}",
                _format_baseline(baseline.get((r.dataset_name, r.metric_name))),
            )
            for r in eval_results
        ],
    )
    card.save(output_dir / "README.md")
    return card


__all__ = [
    "build_model_card",
    "hub_dataset_id",
    "package_project_url",
    "plot_prototypes",
    "read_evaluation_files",
    "usage_snippet",
]
