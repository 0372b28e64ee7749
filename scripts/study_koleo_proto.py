"""Does KoLeo-proto fix partial prototype collapse? Baseline vs KoLeo-proto on Fashion-MNIST and -LT.

python scripts/study_koleo_proto.py --output_dir outputs/study            # about an hour on 2 CPU cores
python scripts/study_koleo_proto.py --quick --threads 1 --output_dir outputs/study_quick   # the same pipeline, CI-sized
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ sits beside hf_koleo, not installed

from experiments.study import load_study_config, run_study  # noqa: E402
from hf_koleo.cli import run_main  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "study_koleo_proto.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--output_dir", default="outputs/study")
    parser.add_argument("--quick", action="store_true", help="tiny runs (CI): same pipeline in under 2 minutes")
    parser.add_argument("--threads", type=int, help="torch threads (1 is fastest on a CPU other jobs share)")
    arguments = parser.parse_args()
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    run_study(load_study_config(arguments.config, arguments.quick), arguments.output_dir)
    print((Path(arguments.output_dir) / "results.md").read_text())


if __name__ == "__main__":
    run_main(main)
