"""Grids of experiments: resumable, one record per run, features shared across a grid's runs."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from clinadapt.errors import ClinadaptError
from clinadapt.runner.experiment import (
    ExperimentConfig,
    FeatureBundle,
    method_kind,
    prepare_features,
    run_experiment,
    run_on_features,
    weights_tag,
)
from clinadapt.runner.records import write_json_atomic

log = logging.getLogger(__name__)


@dataclass
class GridConfig:
    datasets: list[str] = field(
        default_factory=lambda: ["breastmnist"], metadata={"help": "datasets (comma separated)"}
    )
    backbones: list[str] = field(
        default_factory=lambda: ["resnet18"], metadata={"help": "backbones (comma separated)"}
    )
    weights: list[str] = field(
        default_factory=lambda: ["pretrained", "none"],
        metadata={"help": "weights per backbone: pretrained, none (control) or paths"},
    )
    methods: list[str] = field(
        default_factory=lambda: ["knn", "prototype", "linear"],
        metadata={"help": "methods (comma separated)"},
    )
    shots: list[str] = field(
        default_factory=lambda: ["1", "5", "10", "all"], metadata={"help": "shots per class"}
    )
    seeds: int = field(default=3, metadata={"help": "number of seeds (0, 1, ..., seeds-1)"})
    base: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "other ExperimentConfig options for every run"}
    )

    def __post_init__(self) -> None:
        from clinadapt.errors import ConfigError

        if self.seeds < 1:
            raise ConfigError(f"seeds must be at least 1 (runs seeds 0..seeds-1), got {self.seeds}")


def record_path(out_dir: Path, cfg: ExperimentConfig) -> Path:
    """Where a run's record lives; its existence marks the run as done (resume)."""
    dataset = Path(cfg.dataset).name if ("/" in cfg.dataset) else cfg.dataset
    backbone = cfg.backbone.replace(":", "-").replace("/", "-")
    return (
        out_dir
        / dataset
        / backbone
        / weights_tag(cfg.weights)
        / cfg.method
        / f"shots-{cfg.shots}_seed-{cfg.seed}.json"
    )


def is_done(path: Path) -> bool:
    """A run is done when its record exists and succeeded; failed runs are retried."""
    try:
        return not json.loads(path.read_text()).get("failed", False)
    except (OSError, json.JSONDecodeError):
        return False


def expand(grid: GridConfig) -> list[ExperimentConfig]:
    """All runs of the grid, ordered so that runs sharing features are adjacent."""
    from clinadapt.config import from_dict

    runs = []
    for dataset, backbone, weights, method, shots, seed in itertools.product(
        grid.datasets, grid.backbones, grid.weights, grid.methods, grid.shots, range(grid.seeds)
    ):
        options = {
            **grid.base,
            "dataset": dataset,
            "backbone": backbone,
            "weights": weights,
            "method": method,
            "shots": str(shots),
            "seed": seed,
        }
        runs.append(from_dict(ExperimentConfig, options, where="bench"))
    return runs


def validate_names(grid: GridConfig) -> None:
    """Fail before any work on a misspelt dataset, backbone or method name."""
    from clinadapt.adapt import METHODS
    from clinadapt.backbones import BACKBONES
    from clinadapt.data import DATASETS

    for name in grid.datasets:
        if not Path(name).exists():
            DATASETS.get(name)
    for name in grid.backbones:
        if not name.startswith("timm:"):
            BACKBONES.get(name)
    for name in grid.methods:
        METHODS.get(name)


def _feature_key(cfg: ExperimentConfig) -> tuple:
    shared = dataclasses.asdict(cfg)
    for name in (
        "method",
        "method_options",
        "shots",
        "seed",
        "allow_fewer_shots",
        "bootstrap",
        "train",
        "resume",
    ):
        shared.pop(name)
    return tuple(sorted((k, repr(v)) for k, v in shared.items()))


def run_grid(
    grid: GridConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, int]:
    """Run every experiment of ``grid`` whose record does not exist yet.

    A failing run (e.g. too few examples for the requested shots) is written as a failure record
    with its error message, so the grid goes on and the report can say what failed and why; the
    next call retries it.
    """
    out = Path(out_dir)
    validate_names(grid)
    runs = expand(grid)
    todo = [cfg for cfg in runs if not is_done(record_path(out, cfg))]
    counts = {"total": len(runs), "skipped": len(runs) - len(todo), "done": 0, "failed": 0}
    bundles: dict[tuple, FeatureBundle | ClinadaptError] = {}
    bar = tqdm(todo, desc="bench", unit="run", disable=not progress)
    for cfg in bar:
        bar.set_postfix_str(f"{cfg.dataset}/{cfg.backbone}/{cfg.method}/{cfg.shots}/s{cfg.seed}")
        path = record_path(out, cfg)
        try:
            record = _run_one(cfg, path, bundles, progress)
            counts["done"] += 1
        except ClinadaptError as err:
            log.warning("run %s failed: %s", path.relative_to(out), err)
            record = _failure_record(cfg, err)
            counts["failed"] += 1
        write_json_atomic(path, record)
        if on_record is not None:
            on_record(record)
    return counts


def _run_one(
    cfg: ExperimentConfig,
    path: Path,
    bundles: dict[tuple, FeatureBundle | ClinadaptError],
    progress: bool,
) -> dict[str, Any]:
    """One run of the grid; frozen-feature runs share the features held in ``bundles``."""
    if method_kind(cfg.method) == "finetune":
        run_dir = path.with_suffix("")
        cfg.resume = (run_dir / "checkpoint").exists()
        return run_experiment(cfg, run_dir=run_dir, progress=progress)
    key = _feature_key(cfg)
    if key not in bundles:
        bundles.clear()  # keep one feature set in memory at a time
        try:
            bundles[key] = prepare_features(cfg, progress=progress)
        except ClinadaptError as err:  # every run sharing these features fails the same way
            bundles[key] = err
    bundle = bundles[key]
    if isinstance(bundle, ClinadaptError):
        raise bundle
    start = time.perf_counter()
    record = run_on_features(cfg, bundle)
    record["timings"]["total_s"] = time.perf_counter() - start + sum(bundle.timings.values())
    return record


def _failure_record(cfg: ExperimentConfig, err: Exception) -> dict[str, Any]:
    from clinadapt.config import to_dict
    from clinadapt.runner.records import RECORD_VERSION

    return {
        "record_version": RECORD_VERSION,
        "config": to_dict(cfg),
        "failed": True,
        "error": f"{type(err).__name__}: {err}",
        "traceback": traceback.format_exception_only(type(err), err),
    }
