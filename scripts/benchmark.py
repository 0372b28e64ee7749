"""Benchmarks.

python scripts/benchmark.py koleo --num-prototypes 8192 65536 --implementations blocked dense
python scripts/benchmark.py data --batches 20 --config configs/demo.yaml
"""

from __future__ import annotations

import argparse
import json

from hf_koleo.benchmarking import KOLEO_IMPLEMENTATIONS, measure_data_pipeline, measure_koleo_proto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
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
    for num_prototypes in arguments.num_prototypes:
        for implementation in arguments.implementations:
            result = measure_koleo_proto(implementation, num_prototypes, arguments.dim, arguments.repeats)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
