"""Grids of experiments: resumable, one record per run, features shared across a grid's runs.

Besides its axes of runs (datasets, backbones, weights, methods, shots, seeds), a grid can vary
how each run is tested: its test set (``shifts``) and test-time adaptation (``ttas``,
``tta_batch_sizes``, ``tta_options``). A trained run is trained once for all of them, by its
source run (the same run without test-time options, ``finetune.source_config``): the grid trains
it, or restores it from its checkpoint, writes its record when missing, and tests its model under
every other setting.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import socket
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tqdm.auto import tqdm

from clinadapt.config import to_dict
from clinadapt.engine.distributed import from_first, rank
from clinadapt.errors import ClinadaptError, ConfigError
from clinadapt.runner.common import weights_tag
from clinadapt.runner.experiment import (
    ExperimentConfig,
    FeatureBundle,
    method_kind,
    prepare_features,
    run_experiment,
    run_on_features,
    trains,
)
from clinadapt.runner.finetune import TrainedSource, evaluate_trained, source_config, train_source
from clinadapt.runner.identity import GRID_AXES, bundle_key, run_id
from clinadapt.runner.records import failure_record, write_json_atomic
from clinadapt.runner.text import needs_text

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
    method_options: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "options of one method (method.NAME.OPTION=VALUE); a list of values, or "
            "comma-separated values, for a one-value option is a grid over them"
        },
    )
    shifts: list[str] | None = field(
        default=None,
        metadata={
            "help": "test sets, an axis: shift specs (none, medmnistc:<corruption or "
            "all>:<severity or lo-hi>, size:<n>, target:<path>); all and severity ranges become "
            "one test set per corruption and severity (default: the shift of every run)"
        },
    )
    ttas: list[str] | None = field(
        default=None,
        metadata={"help": "test-time adaptation methods, an axis (default: the tta of every run)"},
    )
    tta_batch_sizes: list[int] | None = field(
        default=None,
        metadata={"help": "test-time adaptation batch sizes, an axis over the runs that adapt"},
    )
    tta_options: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={
            "help": "options of one tta method, like method_options (a list of values is a "
            "grid over them)"
        },
    )

    def __post_init__(self) -> None:
        if self.seeds < 1:
            raise ConfigError(f"seeds must be at least 1 (runs seeds 0..seeds-1), got {self.seeds}")
        axes = sorted(set(self.base) & set(GRID_AXES))
        if axes:
            flags = ", ".join(f"--{a}s" if a != "shots" else "--shots" for a in axes)
            raise ConfigError(
                f"{axes} are axes of the grid and cannot be set for every run; use {flags}"
            )
        for axis, option in TEST_TIME_AXES.items():
            values = getattr(self, axis)
            if values is not None and not values:
                raise ConfigError(f"{axis} is empty; list at least one value, or leave it out")
            if values is not None and option in self.base:
                raise ConfigError(
                    f"{option}={self.base[option]!r} is set for every run and {axis} is an axis "
                    f"of the grid; give one of them (e.g. {axis}: [{self.base[option]!r}])"
                )
        if self.ttas is not None and "tta_options" in self.base:
            raise ConfigError(
                "tta options set for every run do not apply to every tta method of the grid "
                f"({self.ttas}); set them per method, e.g. tta_options: {{{self.ttas[-1]}: "
                f"{self.base['tta_options']}}}"
            )
        ttas = self.ttas if self.ttas is not None else [self.base.get("tta", "none")]
        unknown = sorted(set(self.tta_options) - set(ttas))
        if unknown:
            raise ConfigError(
                f"tta options given for {unknown}, which the grid does not run (ttas: {ttas})"
            )


TEST_TIME_AXES = {"shifts": "shift", "ttas": "tta", "tta_batch_sizes": "tta_batch_size"}
"""Grid axes over how runs are tested, and the run option each sets."""


def record_path(out_dir: Path, cfg: ExperimentConfig) -> Path:
    """Where a run's record lives: readable axes, then the run's identity (a hash of its whole
    resolved configuration), so a rerun with any other option is a new run."""
    dataset = Path(cfg.dataset).name if ("/" in cfg.dataset) else cfg.dataset
    backbone = cfg.backbone.replace(":", "-").replace("/", "-")
    return (
        out_dir
        / dataset
        / backbone
        / weights_tag(cfg.weights)
        / cfg.method
        / f"shots-{cfg.shots}_seed-{cfg.seed}_{run_id(cfg)}.json"
    )


def is_done(path: Path) -> bool:
    """A run is done when its record exists and succeeded; failed runs are retried."""
    try:
        return not json.loads(path.read_text()).get("failed", False)
    except (OSError, json.JSONDecodeError):
        return False


def _first_says(check: Callable[[], Any]) -> Any:
    """``check()`` as the first process of ``accelerate launch`` / ``torchrun`` sees it, on
    every process: only the first writes records and claims, and all must run the same runs
    (their extractions and training are shared)."""
    return from_first(check() if rank() == 0 else None)


def _option_values(hint: Any, value: Any) -> list[Any]:
    """The values a grid takes for one method option of type ``hint``: a list (or
    comma-separated text) for an option that holds one value is a grid over them; an option that
    holds a list is a grid only when given a list of lists."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    holds_list = typing.get_origin(hint) in (list, tuple) or any(
        typing.get_origin(a) in (list, tuple) for a in args
    )
    if holds_list:
        several = isinstance(value, list) and value and all(isinstance(v, list) for v in value)
        return list(value) if several else [value]
    if isinstance(value, list):
        return value
    if isinstance(value, str) and "," in value:
        return [yaml.safe_load(v) for v in value.split(",") if v.strip()]
    return [value]


def _method_option_sets(grid: GridConfig, method: str) -> list[dict[str, Any]]:
    """Every combination of the options set for ``method``: shared ones, then its own."""
    from clinadapt.adapt import METHODS

    hints = typing.get_type_hints(METHODS.get(method).config_cls)
    shared = dict(grid.base.get("method_options") or {})
    for name in shared:
        if name not in hints:
            having = [
                m for m in grid.methods if name in typing.get_type_hints(METHODS.get(m).config_cls)
            ]
            example = f"method.{having[0] if having else 'NAME'}.{name}=VALUE"
            raise ConfigError(
                f"method option {name!r} was given for every method, but {method!r} has no "
                f"such option (its options: {sorted(hints)}); set it for one method, e.g. "
                f"{example}"
            )
    options = {**shared, **grid.method_options.get(method, {})}
    return _option_combinations(options, hints, f"method {method!r}")


def _tta_option_sets(grid: GridConfig, name: str) -> list[dict[str, Any] | None]:
    """Every combination of the options set for tta method ``name`` (None: none set)."""
    from clinadapt.tta import TTA_METHODS

    options = grid.tta_options.get(name)
    if not options:
        return [None]
    hints = typing.get_type_hints(TTA_METHODS.get(name).config_cls)
    return _option_combinations(options, hints, f"tta method {name!r}")


def _option_combinations(
    options: dict[str, Any], hints: dict[str, Any], owner: str
) -> list[dict[str, Any]]:
    """Every combination of ``options`` (one value or a list each), checked against the option
    names of their ``owner``'s config."""
    from clinadapt.registry import did_you_mean

    for name in options:
        if name not in hints:
            raise ConfigError(
                f"{name!r} is not an option of {owner} (its options: {sorted(hints)})."
                f"{did_you_mean(name, list(hints))}"
            )
    names = sorted(options)
    values = [_option_values(hints[n], options[n]) for n in names]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def _test_time_sets(grid: GridConfig, dataset: str) -> list[dict[str, Any]]:
    """The test-time options of each run of ``dataset`` the grid makes from one run: one dict
    per (shift, tta, batch size, tta options), holding only what the grid's axes set."""
    from clinadapt.data.shifts import expand_shifts

    size = int(grid.base.get("size", 28))
    shifts: list[str | None] = [None]
    if grid.shifts is not None:
        shifts = list(
            dict.fromkeys(
                s for spec in grid.shifts for s in expand_shifts(dataset, spec, size=size)
            )
        )
    sets = []
    for shift in shifts:
        for name in grid.ttas if grid.ttas is not None else [None]:
            method = name if name is not None else grid.base.get("tta", "none")
            adapts = str(method).lower() != "none"
            sizes = grid.tta_batch_sizes if adapts and grid.tta_batch_sizes else [None]
            for batch_size in sizes:
                for options in _tta_option_sets(grid, method) if adapts else [None]:
                    given = {
                        "shift": shift,
                        "tta": name,
                        "tta_batch_size": batch_size,
                        "tta_options": options,
                    }
                    sets.append({k: v for k, v in given.items() if v is not None})
    return sets


def expand(grid: GridConfig) -> list[ExperimentConfig]:
    """All runs of the grid, ordered so that runs sharing work are adjacent: frozen runs with
    the same features, trained runs with the same source run (``finetune.source_config``)."""
    from clinadapt.config import from_dict

    unknown = sorted(set(grid.method_options) - set(grid.methods))
    if unknown:
        raise ConfigError(
            f"options given for method(s) {unknown}, which the grid does not run "
            f"(methods: {grid.methods})"
        )
    trained = [m for m in grid.methods if trains(m)]
    if grid.base.get("train") and not trained:
        raise ConfigError(
            "train.* options apply to gradient-based methods (lora, adapter, vpt, bitfit, full), "
            f"and the grid runs none of them (methods: {grid.methods})"
        )
    texts = [m for m in grid.methods if needs_text(m)]
    if grid.base.get("class_text") and not texts:
        from clinadapt.adapt import METHODS

        every = ", ".join(n for n in METHODS.names() if needs_text(n))
        raise ConfigError(
            f"class_text applies to vision-language methods ({every}), and the grid runs none of "
            f"them (methods: {grid.methods})"
        )
    option_sets = {method: _method_option_sets(grid, method) for method in grid.methods}
    shots_of = _shots_per_method(grid)
    test_sets = {dataset: _test_time_sets(grid, dataset) for dataset in grid.datasets}
    runs = []
    for dataset, backbone, weights, method, shots, seed in itertools.product(
        grid.datasets, grid.backbones, grid.weights, grid.methods, grid.shots, range(grid.seeds)
    ):
        if str(shots) not in shots_of[method]:
            continue
        base = dict(grid.base)
        if method not in trained:
            base.pop("train", None)
        if method not in texts:
            base.pop("class_text", None)
        for method_options, tested in itertools.product(option_sets[method], test_sets[dataset]):
            options = {
                **base,
                **tested,
                "dataset": dataset,
                "backbone": backbone,
                "weights": weights,
                "method": method,
                "method_options": method_options,
                "shots": str(shots),
                "seed": seed,
            }
            runs.append(from_dict(ExperimentConfig, options, where="bench"))
    groups: dict[str, list[ExperimentConfig]] = {}
    for cfg in runs:
        groups.setdefault(_shared_work(cfg), []).append(cfg)
    return [cfg for group in groups.values() for cfg in group]


def _shared_work(cfg: ExperimentConfig) -> str:
    """What a run shares with others: a frozen run its features, a trained classification run
    its source run's model; other runs share nothing."""
    if _tested_from_source(cfg):
        return "trained " + run_id(source_config(cfg))
    if method_kind(cfg.method) == "frozen":
        return "features " + bundle_key(cfg)
    return "run " + run_id(cfg)


def _tested_from_source(cfg: ExperimentConfig) -> bool:
    """Whether ``cfg`` is a trained classification run, tested with its source run's model."""
    from clinadapt.runner.common import dataset_task

    return method_kind(cfg.method) == "finetune" and not dataset_task(cfg).dense_targets


def _shots_per_method(grid: GridConfig) -> dict[str, list[str]]:
    """The grid's shots each method runs at: zero-shot methods at 0 (the curves' 0-shot point),
    the others at the rest; a method left with none, or a 0 no method takes, is an error."""
    from clinadapt.adapt import METHODS

    zero = {m for m in grid.methods if getattr(METHODS.get(m), "zero_shot", False)}
    shots = [str(s) for s in grid.shots]
    out = {m: [s for s in shots if (s.strip() == "0") == (m in zero)] for m in grid.methods}
    idle = [m for m, taken in out.items() if not taken]
    if idle:
        rule = "zero-shot methods run only at shots 0; the others need shots >= 1 or all"
        raise ConfigError(f"method(s) {idle} have no shots to run at in {shots}: {rule}")
    if "0" in [s.strip() for s in shots] and not zero:
        raise ConfigError(
            "shots 0 is only for zero-shot methods (zeroshot), and the grid runs none of them "
            f"(methods: {grid.methods})"
        )
    return out


def validate_names(grid: GridConfig) -> None:
    """Fail before any work on a misspelt dataset, backbone or method name."""
    from clinadapt.adapt import METHODS
    from clinadapt.backbones import get_spec
    from clinadapt.data import DATASETS

    for name in grid.datasets:
        if not Path(name).exists():
            DATASETS.get(name)
    for name in grid.backbones:
        get_spec(name)
    for name in grid.methods:
        METHODS.get(name)


class RunClaim:
    """A lock file beside a run's record, so that two benches on one folder never compute the
    same run; a claim whose process is gone (killed) is taken over."""

    def __init__(self, record: Path) -> None:
        self.path = record.with_name(record.name + ".lock")
        self.owner = f"{socket.gethostname()} {os.getpid()}"

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    return False
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as handle:
                handle.write(self.owner)
            return True
        return False

    def _stale(self) -> bool:
        try:
            host, pid = self.path.read_text().split()
        except (OSError, ValueError):
            return True  # empty or unreadable: its writer died while creating it
        if host != socket.gethostname():
            return False  # cannot tell from here; the owner removes it when done
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            return False
        return False

    def release(self) -> None:
        try:
            if self.path.read_text() == self.owner:
                self.path.unlink()
        except OSError:
            pass


def run_grid(
    grid: GridConfig,
    out_dir: str | Path,
    *,
    progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, int]:
    """Run every experiment of ``grid`` whose record does not exist yet.

    A failing run (too few examples for the requested shots, or an unexpected error) is written
    as a failure record with its error message, so the grid goes on and the report can say what
    failed and why; the next call retries it. A run another bench is computing is left to it.
    """
    out = Path(out_dir)
    validate_names(grid)
    runs = expand(grid)
    paths = [record_path(out, cfg) for cfg in runs]
    waiting = _first_says(lambda: [i for i, path in enumerate(paths) if not is_done(path)])
    todo = [(runs[i], paths[i]) for i in waiting]
    counts = {
        "total": len(runs),
        "skipped": len(runs) - len(todo),
        "done": 0,
        "failed": 0,
        "claimed": 0,
    }
    bundles: dict[str, FeatureBundle | Exception] = {}
    sources: dict[str, TrainedSource | Exception] = {}
    bar = tqdm(todo, desc="bench", unit="run", disable=not progress)
    for cfg, path in bar:
        bar.set_postfix_str(f"{cfg.dataset}/{cfg.backbone}/{cfg.method}/{cfg.shots}/s{cfg.seed}")
        claim = RunClaim(path)
        if not _first_says(claim.acquire):
            log.warning("run %s is being computed by another bench; left to it", path)
            counts["claimed"] += 1
            continue
        try:
            if _first_says(lambda path=path: is_done(path)):  # another bench finished it
                counts["skipped"] += 1
                continue
            try:
                record = _run_one(cfg, path, out, (bundles, sources), progress)
                counts["done"] += 1
            except Exception as err:  # one bad run must not lose the others
                if not isinstance(err, ClinadaptError):
                    log.exception("run %s failed unexpectedly", path.relative_to(out))
                else:
                    log.warning("run %s failed: %s", path.relative_to(out), err)
                record = failure_record(method_kind(cfg.method), to_dict(cfg), err)
                counts["failed"] += 1
            write_json_atomic(path, record)
        finally:
            claim.release()
        if on_record is not None:
            on_record(record)
    return counts


def _run_one(
    cfg: ExperimentConfig,
    path: Path,
    out: Path,
    shared: tuple[dict[str, FeatureBundle | Exception], dict[str, TrainedSource | Exception]],
    progress: bool,
) -> dict[str, Any]:
    """One run of the grid; frozen-feature runs share the features held in ``bundles``, trained
    classification runs the model of their source run held in ``sources``; every run keeps its
    files (checkpoints, overlays, reliability diagram) in the folder named like the record."""
    bundles, sources = shared
    run_dir = path.with_suffix("")
    if _tested_from_source(cfg):
        source_cfg = source_config(cfg)
        key = run_id(source_cfg)
        if key not in sources:
            sources.clear()  # keep one trained model in memory at a time
            try:
                sources[key] = _trained_source(
                    source_cfg, record_path(out, source_cfg), path, progress
                )
            except Exception as err:  # every run tested with this model fails the same way
                sources[key] = err
        source = sources[key]
        if isinstance(source, Exception):
            raise source
        return evaluate_trained(cfg, source, run_dir, progress=progress)
    kind = method_kind(cfg.method)
    if kind in ("finetune", "prompted"):
        cfg.resume = trains(cfg.method) and (run_dir / "checkpoint").exists()
        return run_experiment(cfg, run_dir=run_dir, progress=progress)
    key = bundle_key(cfg)
    if key not in bundles:
        bundles.clear()  # keep one feature set in memory at a time
        try:
            bundles[key] = prepare_features(cfg, progress=progress)
        except Exception as err:  # every run sharing these features fails the same way
            bundles[key] = err
    bundle = bundles[key]
    if isinstance(bundle, Exception):
        raise bundle
    return run_on_features(cfg, bundle, run_dir=run_dir, progress=progress)


def _trained_source(
    cfg: ExperimentConfig, path: Path, running: Path, progress: bool
) -> TrainedSource:
    """The model of source run ``cfg`` (record ``path``): trained, or restored from its
    checkpoint, in its own folder; its record is written when missing. ``running`` is the
    record of the run that needs it (claimed by this bench already)."""
    run_dir = path.with_suffix("")
    claim = RunClaim(path) if path != running else None
    if claim is not None and not _first_says(claim.acquire):
        raise ClinadaptError(
            f"the run that trains this run's model ({path}) is being computed by another "
            "bench; this run is retried by the next call"
        )
    try:
        cfg.resume = (run_dir / "checkpoint").exists()
        source = train_source(cfg, run_dir, progress=progress)
        if claim is not None and not _first_says(lambda: is_done(path)):
            write_json_atomic(path, evaluate_trained(cfg, source, run_dir, progress=progress))
    finally:
        if claim is not None:
            claim.release()
    return source
