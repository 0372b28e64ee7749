"""Pretrain a ViT with DINO / iBOT + KoLeo-proto.

accelerate launch scripts/pretrain.py --config configs/demo.yaml [--key value ...] [--model.key value ...]
python scripts/pretrain.py --config configs/fashion_mnist.yaml --max_steps 100 --resume
"""

from __future__ import annotations

import sys

from tqdm.contrib.logging import logging_redirect_tqdm

from hf_koleo.cli import run_main
from hf_koleo.console import configure_logging
from hf_koleo.training.arguments import parse_pretraining_args
from hf_koleo.training.launch import relaunch_as_cpu_processes
from hf_koleo.training.summary import format_summary
from hf_koleo.training.trainer import pretrain


def main(argv: list[str] | None = None) -> None:
    relaunch_as_cpu_processes(__file__, sys.argv[1:] if argv is None else argv)
    arguments, model_config = parse_pretraining_args(sys.argv[1:] if argv is None else argv)
    configure_logging(arguments.log_level)
    with logging_redirect_tqdm():  # log lines above the progress bar, not through it
        summary = pretrain(arguments, model_config)
    if "checkpoint" in summary:  # the main process: the full report is in the report JSON
        print(format_summary(summary))
    if summary.get("exit_code"):  # stopped by SIGTERM / SIGINT, with a checkpoint: 128 + the signal, as a shell
        sys.exit(summary["exit_code"])


if __name__ == "__main__":
    run_main(main)
