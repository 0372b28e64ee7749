"""Benchmarks: ``python scripts/benchmark.py koleo --num-prototypes 8192 65536 --implementations blocked dense``."""

from __future__ import annotations

import argparse
import json

from hf_koleo.benchmarking import KOLEO_IMPLEMENTATIONS, measure_koleo_proto


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    koleo = commands.add_parser("koleo", help="KoLeo-proto forward+backward time and peak memory")
    koleo.add_argument("--num-prototypes", type=int, nargs="+", default=[1024, 8192, 65536])
    koleo.add_argument("--dim", type=int, default=256)
    koleo.add_argument("--repeats", type=int, default=3)
    koleo.add_argument("--implementations", nargs="+", default=["blocked"], choices=sorted(KOLEO_IMPLEMENTATIONS))
    arguments = parser.parse_args()
    for num_prototypes in arguments.num_prototypes:
        for implementation in arguments.implementations:
            result = measure_koleo_proto(implementation, num_prototypes, arguments.dim, arguments.repeats)
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
