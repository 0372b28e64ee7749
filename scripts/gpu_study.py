"""The GPU study: recipe on a validation split, then baseline vs KoLeo-proto at K = 4096..65536, in chunks.

python scripts/gpu_study.py plan                          # the ordered runs, and which have results
python scripts/gpu_study.py run --budget_seconds 480      # one chunk: train/evaluate what fits, resumable
python scripts/gpu_study.py report                        # docs/results_gpu.md, docs/results.json, figures
python scripts/gpu_study.py run --quick --threads 1 --work_dir /tmp/q --results_dir /tmp/q/runs   # CI-sized

Each finished run leaves one small JSON in --results_dir (default docs/study_gpu/runs, kept in git); a
run cut by the budget keeps its checkpoint in --work_dir and the next `run` resumes it. On the GPU
machine, bring the new JSON files back through $OUT as one archive (see docs/results_gpu.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ sits beside hf_koleo, not installed

import torch  # noqa: E402

from experiments.gpu_study import (  # noqa: E402
    load_gpu_study_config,
    plan_runs,
    planned_images,
    record_status,
    run_chunk,
)
from experiments.gpu_study_report import load_results, plot_results, render_markdown, results_json  # noqa: E402
from hf_koleo.cli import run_main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "study_gpu.yaml"
DEFAULT_RESULTS = ROOT / "docs" / "study_gpu" / "runs"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("plan", "run", "report"))
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--quick", action="store_true", help="the config's quick: section (tiny runs, CPU)")
    parser.add_argument("--results_dir", default=str(DEFAULT_RESULTS), help="one JSON per finished run")
    parser.add_argument("--work_dir", default="outputs/study_gpu", help="run folders and checkpoints")
    parser.add_argument(
        "--backbone_dir",
        default="outputs/study_gpu_backbones",
        help="release folders (backbone + card) of keep_backbone stages",
    )
    parser.add_argument("--budget_seconds", type=float, default=480.0, help="run: stop starting runs after this")
    parser.add_argument("--output", default=str(ROOT / "docs" / "results_gpu.md"), help="report: the markdown")
    parser.add_argument("--json", default=str(ROOT / "docs" / "results.json"), help="report: the headline JSON")
    parser.add_argument("--figures", default=str(ROOT / "docs" / "figures"), help="report: the PNG folder")
    parser.add_argument("--threads", type=int, help="torch threads (1 is fastest on a CPU other jobs share)")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    results_dir = Path(arguments.results_dir)
    if arguments.command == "plan":
        config = load_gpu_study_config(arguments.config, arguments.quick)
        total = 0
        for run in plan_runs(config):
            images = planned_images(config, run)
            total += images
            status = record_status(config, run, results_dir)
            print(f"{status:<7} {run.stage:<10} {run.name:<44} {images / 1e6:6.2f} M images")
        print(f"{total / 1e6:.1f} M images in all")
    elif arguments.command == "run":
        config = load_gpu_study_config(arguments.config, arguments.quick)
        outcome = run_chunk(
            config, arguments.work_dir, results_dir, arguments.budget_seconds, backbone_dir=arguments.backbone_dir
        )
        print(json.dumps(outcome, indent=1))
    else:
        results = load_results(results_dir, load_gpu_study_config(arguments.config, arguments.quick))
        Path(arguments.output).write_text(render_markdown(results))
        Path(arguments.json).write_text(json.dumps(results_json(results), indent=1))
        for path in plot_results(results, arguments.figures):
            print(path)
        print(Path(arguments.output).read_text())


if __name__ == "__main__":
    run_main(main)
