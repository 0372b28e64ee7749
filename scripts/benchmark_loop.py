"""Speed of the training loop on the accelerator: data path, step and its scaling, end to end, host syncs.

python scripts/benchmark_loop.py --output docs/benchmarks_gpu.md      # the GPU-speed suite (run on a GPU)
python scripts/benchmark_loop.py --part core --output core.md          # the targets only (one 10-minute call)
python scripts/benchmark_loop.py --part extra --output extra.md        # recipe and compiled variants
python scripts/benchmark_loop.py --quick --output /tmp/loop.md        # the same pipeline, tiny, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # experiments/ sits beside hf_koleo, not installed

from experiments.loop_benchmark import SUITE_PARTS, render_loop_suite_markdown, run_loop_suite  # noqa: E402
from hf_koleo.cli import run_main  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="docs/benchmarks_gpu.md")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (CPU, tests)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--koleo-prototypes", type=int, help="K of the KoLeo-proto timing (65536; 1024 with --quick)")
    parser.add_argument(
        "--part",
        choices=SUITE_PARTS,
        default="all",
        help="core: targets, overhead, KoLeo-proto, peer; extra: recipe and compiled variants (one device call each)",
    )
    arguments = parser.parse_args()
    koleo_prototypes = arguments.koleo_prototypes or (1024 if arguments.quick else 65536)
    output = Path(arguments.output).resolve()
    os.chdir(ROOT)  # the suite names its configs relative to the checkout
    output.parent.mkdir(parents=True, exist_ok=True)

    def write(results: dict) -> None:  # after every measurement: a run cut short keeps what it measured
        output.write_text(render_loop_suite_markdown(results, "python " + " ".join(sys.argv)))
        output.with_suffix(".json").write_text(json.dumps(results, indent=2))

    run_loop_suite(arguments.quick, arguments.steps, koleo_prototypes, progress=write, part=arguments.part)
    print(output.read_text())


if __name__ == "__main__":
    run_main(main)
