"""Benchmarks.

python scripts/benchmark.py all --output docs/benchmarks.md    # the whole suite -> markdown
python scripts/benchmark.py koleo --num-prototypes 8192 65536 --implementations blocked dense
python scripts/benchmark.py data --batches 20 --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # experiments/ sits beside hf_koleo, not installed

from experiments.benchmarks import (  # noqa: E402
    KOLEO_IMPLEMENTATIONS,
    measure_data_pipeline,
    measure_koleo_proto,
    render_benchmarks_markdown,
    run_benchmark_suite,
)
from hf_koleo.cli import run_main  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    suite = commands.add_parser("all", help="every benchmark, written as markdown")
    suite.add_argument("--output", default="docs/benchmarks.md")
    suite.add_argument("--rounds", type=int, default=5)
    koleo = commands.add_parser("koleo", help="KoLeo-proto forward+backward time and peak memory")
    koleo.add_argument("--num-prototypes", type=int, nargs="+", default=[1024, 8192, 65536])
    koleo.add_argument("--dim", type=int, default=256)
    koleo.add_argument("--repeats", type=int, default=3)
    koleo.add_argument("--implementations", nargs="+", default=["blocked"], choices=sorted(KOLEO_IMPLEMENTATIONS))
    data = commands.add_parser("data", help="data pipeline img/s for a pretraining config")
    data.add_argument("--batches", type=int, default=20)
    arguments, run_arguments = parser.parse_known_args()  # the data command passes the rest to pretrain.py's parser
    if arguments.command == "data":
        print(json.dumps(measure_data_pipeline(run_arguments, arguments.batches)), flush=True)
        return
    if run_arguments:
        parser.error(f"unrecognized arguments: {run_arguments}")
    if arguments.command == "all":
        results = run_benchmark_suite(rounds=arguments.rounds)
        command = "python " + " ".join(sys.argv)
        Path(arguments.output).parent.mkdir(parents=True, exist_ok=True)
        Path(arguments.output).write_text(render_benchmarks_markdown(results, command))
        Path(arguments.output).with_suffix(".json").write_text(json.dumps(results, indent=2))
        print(Path(arguments.output).read_text())
        return
    for num_prototypes in arguments.num_prototypes:
        for implementation in arguments.implementations:
            print(json.dumps(measure_koleo_proto(implementation, num_prototypes, arguments.dim, arguments.repeats)))


if __name__ == "__main__":
    run_main(main)
