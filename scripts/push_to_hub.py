"""Export a checkpoint with its card and push it to the Hub (honours HF_TOKEN and HF_ENDPOINT).

    python scripts/push_to_hub.py --checkpoint outputs/demo/checkpoints/checkpoint-00000150 \
        --repo-id you/koleo-vit-demo --eval-results outputs/eval/*.json --private
    python scripts/push_to_hub.py --checkpoint ... --repo-id you/koleo-vit-demo --dry-run outputs/upload_preview
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from hf_koleo.cli import debug_requested, run_main
from hf_koleo.console import configure_logging
from hf_koleo.hub import DEFAULT_HUB_TIMEOUT, prepare_upload_folder, push_folder


def main() -> None:
    configure_logging("debug" if debug_requested() else "info")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--eval-results", nargs="*", default=[])
    parser.add_argument("--private", action="store_true")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    parser.add_argument("--commit-message", default="Upload hf_koleo backbone")
    parser.add_argument("--include-pretraining-model", action="store_true")
    parser.add_argument("--allow-pickle", action="store_true")
    parser.add_argument("--license", default="apache-2.0")
    parser.add_argument("--project-url", default=None, help="where the card links hf_koleo (default: package metadata)")
    parser.add_argument("--token", default=None, help="default: HF_TOKEN or the cached login")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_HUB_TIMEOUT,
        help="seconds one request may wait on the Hub before the push stops with an error",
    )
    parser.add_argument(
        "--dry-run",
        metavar="FOLDER",
        default=None,
        help="write the exact folder that would be uploaded here and push nothing",
    )
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as staging:
        folder = prepare_upload_folder(
            arguments.checkpoint,
            arguments.dry_run or Path(staging) / "upload",
            arguments.repo_id,
            arguments.eval_results,
            arguments.include_pretraining_model,
            arguments.allow_pickle,
            arguments.license,
            arguments.project_url,
            output_option="--dry-run",
        )
        files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        if arguments.dry_run:
            print(
                f"dry run: would upload to {arguments.repo_id} ({'private' if arguments.private else 'public'}, "
                f"revision {arguments.revision or 'main'}): {files}"
            )
            return
        url = push_folder(
            folder,
            arguments.repo_id,
            arguments.private,
            arguments.revision,
            arguments.commit_message,
            arguments.token,
            arguments.timeout,
        )
    print(f"pushed {len(files)} files: {url}")


if __name__ == "__main__":
    run_main(main)
