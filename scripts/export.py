"""Export a pretraining checkpoint as a stock transformers backbone with its model card.

    python scripts/export.py --checkpoint outputs/demo/checkpoints/checkpoint-00000150 --output outputs/demo/export \
        --eval-results outputs/eval/demo_backbone_fmnist.json
"""

from __future__ import annotations

import argparse

from hf_koleo.cli import debug_requested, run_main
from hf_koleo.console import configure_logging
from hf_koleo.hub import prepare_upload_folder


def main() -> None:
    configure_logging("debug" if debug_requested() else "info")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint folder written by pretraining")
    parser.add_argument("--output", required=True)
    parser.add_argument("--model-id", default=None, help="repo id the card's usage snippet loads (default: --output)")
    parser.add_argument("--eval-results", nargs="*", default=[], help="scripts/evaluate.py JSON files")
    parser.add_argument(
        "--include-pretraining-model",
        action="store_true",
        help="also write the full model (heads, prototypes) with code for trust_remote_code",
    )
    parser.add_argument("--allow-pickle", action="store_true", help="accept pytorch_model.bin checkpoints")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--project-url", default=None, help="where the card links hf_koleo (default: package metadata)")
    arguments = parser.parse_args()
    folder = prepare_upload_folder(
        arguments.checkpoint,
        arguments.output,
        arguments.model_id or arguments.output,
        arguments.eval_results,
        arguments.include_pretraining_model,
        arguments.allow_pickle,
        arguments.license,
        arguments.project_url,
    )
    print(f"exported to {folder}: " + ", ".join(sorted(path.name for path in folder.iterdir())))


if __name__ == "__main__":
    run_main(main)
