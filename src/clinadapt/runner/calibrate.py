"""The ``calibration`` block of a classification record: temperature scaling (Guo et al. 2017)
fitted on the validation examples the run already used, and the test ECE, classwise ECE and
Brier score before and after it (``clinadapt.eval.calibration``), with a reliability diagram in
the run folder when there is one.

No labels beyond the run's own: a run that used no validation labels (a method that ignores
them, or no validation split) gets no temperature, and the block says why. The temperature is
fitted on the source model's validation outputs (without test-time adaptation or adaptive
temperature: the model as trained or fitted) and applied to the run's final test outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.data.info import TaskType
from clinadapt.eval.calibration import (
    apply_temperature,
    calibration_metrics,
    fit_temperature,
    logits_from_probabilities,
    plot_reliability,
)
from clinadapt.runner.records import is_main_process

DIAGRAM = "reliability.png"
N_BINS = 15


def calibration_block(
    task: TaskType | str,
    test_labels: np.ndarray,
    test_probs: np.ndarray,
    val: tuple[np.ndarray, np.ndarray] | None,
    *,
    not_fitted: str = "",
    run_dir: Path | None = None,
    title: str = "",
) -> dict[str, Any]:
    """``val`` is (labels, probabilities) of the validation examples the run used, or None with
    ``not_fitted`` saying why there are none; ``run_dir`` gets the reliability diagram."""
    before = calibration_metrics(test_probs, test_labels, task, n_bins=N_BINS)
    block: dict[str, Any] = {"n_bins": N_BINS}
    panels = {"before temperature scaling": test_probs}
    if val is None or len(val[0]) == 0:
        block.update(fitted=False, temperature=None, reason=not_fitted or "no validation labels")
        block["test"] = {"before": before}
    else:
        fit = fit_temperature(logits_from_probabilities(val[1], task), val[0], task)
        after_probs = apply_temperature(
            logits_from_probabilities(test_probs, task), fit.temperature, task
        )
        block.update(
            fitted=True,
            temperature=fit.temperature,
            fitted_on=f"the source model's outputs on the {len(val[0])} validation examples "
            "the run used (before test-time adaptation and adaptive temperature)",
            val_examples=len(val[0]),
            val_nll_before=fit.nll_before,
            val_nll_after=fit.nll_after,
        )
        block["test"] = {
            "before": before,
            "after": calibration_metrics(after_probs, test_labels, task, n_bins=N_BINS),
        }
        panels[f"after (T = {fit.temperature:.3g})"] = after_probs
    if run_dir is not None and is_main_process():
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        plot_reliability(
            Path(run_dir) / DIAGRAM, test_labels, panels, task, n_bins=N_BINS, title=title
        )
        block["diagram"] = DIAGRAM
    return block
