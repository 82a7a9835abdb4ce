"""Experiments, grids, records, reports and presets."""

from clinadapt.runner.bench import GridConfig, run_grid
from clinadapt.runner.experiment import ExperimentConfig, run_experiment
from clinadapt.runner.report import build_report

__all__ = ["ExperimentConfig", "GridConfig", "build_report", "run_experiment", "run_grid"]
