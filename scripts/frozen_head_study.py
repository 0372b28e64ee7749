"""Partial prototype collapse with a frozen backbone: head-only DINO, baseline vs KoLeo-proto.

python scripts/frozen_head_study.py --backbone /tmp/demo/backbone    # docs/frozen_head.md (~40 min on 2 CPU cores)
python scripts/frozen_head_study.py --quick --backbone DIR --output_dir /tmp/fh   # the same pipeline in seconds
python scripts/frozen_head_study.py --from_json docs/frozen_head.json              # re-render docs/frozen_head.md

The backbone is any folder ``AutoModel.from_pretrained`` loads with an image processor, e.g. the
``backbone`` folder ``scripts/pretrain.py --config configs/demo.yaml`` exports.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ sits beside hf_koleo, not installed

import torch  # noqa: E402

from experiments.frozen_head import run_study, study_plans  # noqa: E402
from experiments.frozen_head_report import plot_study, render_markdown  # noqa: E402
from hf_koleo.cli import run_main  # noqa: E402

VARIANTS = {"baseline": 0.0, "koleo_proto": 0.1}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu} CPU, {os.cpu_count()} cores ({torch.get_num_threads()} torch threads), torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", help="a folder AutoModel.from_pretrained loads (with its image processor)")
    parser.add_argument(
        "--output_dir", default="docs", help="writes frozen_head.md/.json and figures/frozen_head_*.png"
    )
    parser.add_argument("--data", help="data source (default fashion_mnist:train; demo with --quick)")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1; 0 with --quick)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: the whole pipeline in seconds")
    parser.add_argument("--threads", type=int, help="torch threads (1 is fastest on a CPU other jobs share)")
    parser.add_argument("--backbone_origin", help="how the backbone was made (a command), shown in the report")
    parser.add_argument("--notes_file", help="markdown read after the run, kept in the JSON and shown in the report")
    parser.add_argument("--from_json", help="re-render the report and figures of a finished study's JSON (no runs)")
    arguments = parser.parse_args()
    output_dir = Path(arguments.output_dir)
    if arguments.from_json:
        results = json.loads(Path(arguments.from_json).read_text())
        if arguments.backbone_origin or arguments.notes_file:
            if arguments.backbone_origin:
                results["backbone_origin"] = arguments.backbone_origin
            if arguments.notes_file:
                results["notes"] = Path(arguments.notes_file).read_text()
            (output_dir / "frozen_head.json").write_text(json.dumps(results, indent=1))
        write_report(results, output_dir)
        return
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    if not arguments.backbone or not Path(arguments.backbone).is_dir():
        raise FileNotFoundError(
            f"--backbone {arguments.backbone!r} is not a folder (export one with scripts/pretrain.py)"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    data = arguments.data or ("demo" if arguments.quick else "fashion_mnist:train")
    seeds = [int(seed) for seed in (arguments.seeds or ("0" if arguments.quick else "0,1")).split(",")]
    start = time.perf_counter()
    results = run_study(study_plans(arguments.quick, arguments.backbone, data), VARIANTS, seeds)
    results.update(
        command="python " + " ".join(sys.argv),
        machine=machine(),
        quick=arguments.quick,
        variants=VARIANTS,
        seeds=seeds,
        backbone_origin=arguments.backbone_origin,
        notes=Path(arguments.notes_file).read_text() if arguments.notes_file else None,
        seconds=time.perf_counter() - start,
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "frozen_head.json").write_text(json.dumps(results, indent=1))
    write_report(results, output_dir)


def write_report(results: dict, output_dir: Path) -> None:
    """``frozen_head.md`` and ``figures/frozen_head_*.png`` in ``output_dir`` from a study's results."""
    plot_study(results, output_dir / "figures" / "frozen_head")
    (output_dir / "frozen_head.md").write_text(render_markdown(results))
    print((output_dir / "frozen_head.md").read_text())


if __name__ == "__main__":
    run_main(main)
