"""Convert Debian's Fashion-MNIST IDX files into parquet shards (optionally long-tailed or a balanced slice).

python scripts/prepare_fashion_mnist.py --split train --output data/fmnist_train
python scripts/prepare_fashion_mnist.py --split train --imbalance-ratio 100 --output data/fmnist_train_lt100
"""

from __future__ import annotations

import argparse
import json

from hf_koleo.cli import run_main
from hf_koleo.data.fashion_mnist import RAW_DIR, prepare_fashion_mnist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--split", choices=["train", "test"], default="train")
    parser.add_argument("--imbalance-ratio", type=float, default=None)
    parser.add_argument("--per-class", type=int, default=None)
    parser.add_argument("--n-shards", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw-dir", default=str(RAW_DIR))
    arguments = parser.parse_args()
    output = prepare_fashion_mnist(
        arguments.output,
        arguments.split,
        arguments.imbalance_ratio,
        arguments.per_class,
        arguments.n_shards,
        arguments.seed,
        arguments.raw_dir,
    )
    print(json.dumps(json.loads((output / "metadata.json").read_text()), indent=2))


if __name__ == "__main__":
    run_main(main)
