"""``python -m experiments {plan,run,report} SPEC.yaml``: every study and benchmark of the project.

python -m experiments plan configs/experiments/gpu_study.yaml                      # the runs in order, their status
python -m experiments run configs/experiments/gpu_study.yaml --budget_seconds 480  # pending runs within 8 minutes
python -m experiments report configs/experiments/gpu_study.yaml                    # docs from the records alone
python -m experiments results                                                      # docs/results.json + claims
python -m experiments run configs/experiments/frozen_head.yaml --quick --records /tmp/r --work_dir /tmp/w

``--quick`` merges the spec's ``quick:`` section (tiny runs for tests and CI). ``run`` is resumable:
call it again and it goes on with what is pending (a run the budget cut resumes from its checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from hf_koleo.cli import run_main
from hf_koleo.console import configure_logging

from .registry import plan_note, report
from .results import write_results
from .runner import run_pending
from .spec import load_spec
from .store import PROGRAM, Store

ROOT = Path(__file__).resolve().parents[1]


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("command", choices=("plan", "run", "report", "results"))
    parser.add_argument("spec", nargs="?", help="an experiment spec (configs/experiments/*.yaml); not for results")
    parser.add_argument("--quick", action="store_true", help="merge the spec's quick: section (tiny runs)")
    parser.add_argument("--records", help="the records folder (default: the spec's records)")
    parser.add_argument("--work_dir", help="run folders and checkpoints (default: the spec's work_dir)")
    parser.add_argument("--report_dir", help="report: where to write (default: the spec's report_dir)")
    parser.add_argument("--budget_seconds", type=float, default=float("inf"), help="run: start no run after this")
    parser.add_argument("--only", nargs="+", help="run: only these runs (by name)")
    parser.add_argument("--retry_failed", action="store_true", help="run: run failed runs again")
    parser.add_argument(
        "--fresh_process", action="store_true", default=None, help="run: each run in a new Python process"
    )
    parser.add_argument("--in_process", action="store_true", help=argparse.SUPPRESS)  # a fresh process's own run
    parser.add_argument("--threads", type=int, help="torch threads (1 is often fastest on 2 shared cores)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    configure_logging("info")
    logging.getLogger("experiments").setLevel(logging.INFO)
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    if arguments.command == "results":  # every study's committed records, not one spec's
        for path in write_results(ROOT, Path(arguments.report_dir or ROOT / "docs")):
            print(path)
        return
    if not arguments.spec:
        raise ValueError(f"{arguments.command} needs a spec: python -m experiments {arguments.command} SPEC.yaml")
    spec = load_spec(arguments.spec, arguments.quick)
    store = Store(arguments.records or spec.folder("records", f"outputs/experiments/{spec.name}/records"))
    if arguments.command == "plan":
        for run in spec.runs:
            note = plan_note(run.kind)
            print(f"{store.status(run):<8} {run.stage:<10} {run.name:<48} {note(run.params) if note else ''}".rstrip())
    elif arguments.command == "run":
        work_dir = arguments.work_dir or spec.folder("work_dir", f"outputs/experiments/{spec.name}")
        outcome = run_pending(
            spec, store, work_dir, arguments.budget_seconds,
            False if arguments.in_process else arguments.fresh_process, arguments.retry_failed,
            arguments.only,
        )  # fmt: skip
        print(json.dumps(outcome.as_dict(), indent=1))
    else:
        if not spec.report:
            raise ValueError(f"{spec.path}: no report named (add report: NAME)")
        records, left_out = store.records(spec.runs)
        report_dir = Path(arguments.report_dir or spec.folder("report_dir", "docs"))
        for path in report(spec.report)(spec, records, left_out, report_dir):
            print(path)


if __name__ == "__main__":
    sys.argv[0] = PROGRAM  # errors read "python -m experiments: error: ...", records name the command
    run_main(main)
