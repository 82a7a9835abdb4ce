"""Does bf16 feature extraction change the answer? Linear-probe AUC with bf16 versus fp32."""

from __future__ import annotations

import argparse
import tempfile

from _common import default_data_root, default_weights, write_result
from clinadapt.runner.experiment import ExperimentConfig, run_experiment


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", default="breastmnist")
    parser.add_argument("--data-root", default=default_data_root())
    parser.add_argument("--backbone", default="mobilenetv2_100")
    parser.add_argument("--weights", default=None, help="default: local weights, else none")
    args = parser.parse_args()
    weights = args.weights or default_weights(args.backbone)

    result = {"dataset": args.dataset, "backbone": args.backbone, "weights": weights}
    with tempfile.TemporaryDirectory() as cache_dir:
        for precision in ("fp32", "bf16"):
            cfg = ExperimentConfig(
                dataset=args.dataset,
                data_root=args.data_root,
                backbone=args.backbone,
                weights=weights,
                method="linear",
                resize="bilinear",
                precision=precision,
                cache_dir=cache_dir,
                bootstrap=0,
            )
            rec = run_experiment(cfg, progress=False)
            result[f"{precision}_test_auc"] = rec["metrics"]["test"]["auc"]
            result[f"{precision}_test_acc"] = rec["metrics"]["test"]["acc"]
            result[f"{precision}_extraction_s"] = sum(
                v for k, v in rec["timings"].items() if k.startswith("features_")
            )
    result["auc_difference_bf16_minus_fp32"] = result["bf16_test_auc"] - result["fp32_test_auc"]
    write_result("bf16_auc", result)


if __name__ == "__main__":
    main()
