"""Task-aware evaluation: MedMNIST-compatible AUC/ACC, imbalance-aware metrics, calibration and
bootstrap confidence intervals."""

from clinadapt.eval.metrics import auc, bootstrap_ci, evaluate

__all__ = ["auc", "bootstrap_ci", "evaluate"]
