"""Evaluate frozen features: weighted kNN, linear probe, few-shot (or all), as the DINO family does.

    python scripts/evaluate.py all --model outputs/demo/backbone --train-data demo --test-data demo:test \
        --output outputs/demo/eval_knn_linear_fewshot.json
    python scripts/evaluate.py knn --model pixels --train-data fashion_mnist:train --test-data fashion_mnist:test \
        --output outputs/pixels_knn.json
"""

from __future__ import annotations

import argparse
import json

from hf_koleo.cli import debug_requested, run_main
from hf_koleo.console import configure_logging
from hf_koleo.evaluation import check_result_path, default_device, evaluate_backbone, write_result


def summary_lines(result: dict) -> list[str]:
    lines = [
        f"model {result['model']}: train {result['data']['train']} ({result['data']['n_train']}), "
        f"test {result['data']['test']} ({result['data']['n_test']})"
    ]
    for entry in result["model_index"]:
        lines.append(f"  {entry['metric_name']:<36} {entry['metric_value']:6.2f}")
    return lines


def main() -> None:
    configure_logging("debug" if debug_requested() else "info")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("protocol", choices=["knn", "linear", "fewshot", "all"])
    parser.add_argument("--model", required=True, help="exported backbone folder, Hub id, or 'pixels'")
    parser.add_argument("--train-data", required=True)
    parser.add_argument("--test-data", required=True)
    parser.add_argument("--output", required=True, help="result JSON file")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--limit-test", type=int, default=None)
    parser.add_argument("--device", default=default_device(), help="default: the accelerator if present, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute features even if cached")
    parser.add_argument("--allow-pickle", action="store_true", help="accept models with only pytorch_model.bin")
    arguments = parser.parse_args()
    check_result_path(arguments.output)  # before minutes of feature extraction, not after
    result = evaluate_backbone(
        arguments.protocol,
        arguments.model,
        arguments.train_data,
        arguments.test_data,
        arguments.batch_size,
        arguments.limit_train,
        arguments.limit_test,
        arguments.device,
        arguments.seed,
        not arguments.no_cache,
        arguments.allow_pickle,
    )
    write_result(result, arguments.output)
    print("\n".join(summary_lines(result)))
    print(json.dumps({"output": arguments.output}))


if __name__ == "__main__":
    run_main(main)
