"""One device call that decides the most: the decisive pair, then the loop benchmark's core rows.

    python scripts/gpu_window.py --budget_seconds 520 --out $OUT     # on the GPU machine (docs/gpu_study.md)
    python scripts/gpu_window.py --quick --out /tmp/window           # the same pipeline in seconds on a CPU

Runs ``configs/experiments/gpu_window.yaml`` with the harness, its records written straight into
``--out``/runs (a call killed by the device's limit still brings back every run finished by then), then
renders its report into ``--out``. Back here they go into docs/gpu_window/runs (docs/gpu_study.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.__main__ import main as experiments  # noqa: E402
from hf_koleo.cli import run_main  # noqa: E402

SPEC = ROOT / "configs" / "experiments" / "gpu_window.yaml"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget_seconds", type=float, default=520.0, help="start nothing after this")
    parser.add_argument("--out", required=True, help="the folder the records and the report go into")
    parser.add_argument("--quick", action="store_true", help="the spec's quick: section (tiny runs, CPU)")
    parser.add_argument("--records", help="the records folder (default: OUT/runs)")
    parser.add_argument("--work_dir", help="run folders (default: the spec's, outputs/gpu_window)")
    arguments = parser.parse_args(argv)
    out = Path(arguments.out)
    records = arguments.records or str(out / "runs")
    common = [str(SPEC), "--records", records, *(["--quick"] if arguments.quick else [])]
    work = ["--work_dir", arguments.work_dir] if arguments.work_dir else []
    experiments(["run", *common, *work, "--budget_seconds", str(arguments.budget_seconds)])
    experiments(["report", *common, "--report_dir", str(out)])


if __name__ == "__main__":
    run_main(main)
