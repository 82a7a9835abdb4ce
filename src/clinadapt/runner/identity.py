"""A run's identity is its whole resolved configuration.

Each ``ExperimentConfig`` field says in its metadata what it decides (``scope``):
- ``features``: the features a backbone gives (data, backbone, weights, preprocessing, precision);
- ``run``: what a run does with them (method and its options, training, shots, seed);
- ``place``: where things are read or kept (data root, cache, resume flag): never identity.

Bench uses ``run_id`` to tell a finished run from a changed one, ``bundle_key`` to share
features between runs, and reports use ``flat_options`` to show the options that differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

SCOPES = ("features", "run", "place")
GRID_AXES = ("dataset", "backbone", "weights", "method", "shots", "seed")
"""The options a bench grid varies itself; every other option is the same for all its runs."""


def scope_fields(cfg_cls: type, *scopes: str) -> list[str]:
    """Names of the config fields in ``scopes``, in declaration order."""
    return [f.name for f in dataclasses.fields(cfg_cls) if f.metadata.get("scope") in scopes]


def _location(value: str) -> str:
    """A path option as an absolute path (the same files from another folder are the same run);
    a registered name stays as it is."""
    if value in ("pretrained", "none") or not Path(value).expanduser().exists():
        return value
    return str(Path(value).expanduser().resolve())


def resolved_options(cfg: Any) -> dict[str, Any]:
    """Everything that decides a run's result: the config with the method's and (for trained
    runs) the training options filled in with their defaults, ``auto`` options made the
    dataset's task's choice, paths made absolute."""
    from clinadapt.adapt import METHODS
    from clinadapt.config import from_dict, to_dict
    from clinadapt.data.shifts import canonical_shift
    from clinadapt.runner.common import dataset_task, head_kind, resize_mode
    from clinadapt.runner.text import resolve_class_text
    from clinadapt.runner.tta import resolve_options

    method = METHODS.get(cfg.method)
    task = dataset_task(cfg)
    options = {name: getattr(cfg, name) for name in scope_fields(type(cfg), "features", "run")}
    options["resize"] = resize_mode(cfg, task)
    if len(task.head_kinds) > 1:
        options["head"] = head_kind(cfg, task)
    else:  # one kind of head: nothing to choose, nothing that tells runs apart
        head_kind(cfg, task)
        options.pop("head")
    options["dataset"] = _location(cfg.dataset)
    options["shift"] = canonical_shift(cfg.shift)
    if options["shift"] == "none":  # runs on the clean test set keep their ids
        options.pop("shift")
    options["weights"] = _location(cfg.weights)
    options["shots"] = str(cfg.shots_value())
    options["val_shots"] = str(cfg.val_shots_value())
    options["method_options"] = to_dict(
        from_dict(method.config_cls, dict(cfg.method_options), where=f"method {cfg.method}")
    )
    if method.kind == "finetune":
        from clinadapt.runner.common import train_config

        options["train"] = to_dict(train_config(cfg, task))
    elif getattr(method, "trains", False):
        from clinadapt.runner.prompted_train import prompted_train_config

        options["train"] = to_dict(prompted_train_config(cfg, task))
    else:
        options.pop("train")
    if "train" in options:  # how fast a run trains, not what it trains
        options["train"].pop("compile")
    resolve_options(cfg, options)
    resolve_class_text(cfg, options)
    return json.loads(json.dumps(options, default=str))


def run_id(cfg: Any) -> str:
    """A short hash of ``resolved_options``: the same command resumes, a changed one runs anew."""
    return run_block(cfg)["id"]


def run_block(cfg: Any) -> dict[str, Any]:
    """The ``run`` block of a record: ``id`` and the ``options`` it hashes."""
    options = resolved_options(cfg)
    canonical = json.dumps(options, sort_keys=True, separators=(",", ":"))
    return {"id": hashlib.sha256(canonical.encode()).hexdigest()[:10], "options": options}


def bundle_key(cfg: Any) -> str:
    """Runs with the same key can share one feature extraction."""
    names = scope_fields(type(cfg), "features", "place")
    canonical = json.dumps({n: getattr(cfg, n) for n in names}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def flat_options(resolved: dict[str, Any]) -> dict[str, Any]:
    """``resolved_options`` as one level: ``method.k``, ``train.lr``, ``tta.lr``; lists become
    tuples so values can be compared and grouped. The seed is left out (reports aggregate over
    it), and a validation budget equal to the shots reads ``as shots``, so it does not vary with
    them. The test-time options read ``tta=none`` and ``adaptive_temperature=off`` where the run
    used neither (they are left out of its identity), so such runs differ from those that did."""
    flat: dict[str, Any] = {"tta": "none", "adaptive_temperature": "off"}
    nested = {"method_options": "method", "train": "train", "tta_options": "tta"}
    for key, value in resolved.items():
        if key == "seed":
            continue
        if key == "val_shots" and value == resolved.get("shots"):
            value = "as shots"  # the default rule, not an option that differs between rows
        if key in nested and isinstance(value, dict):
            prefix = nested[key]
            for inner, v in value.items():
                if (prefix, inner) != ("train", "seed"):
                    flat[f"{prefix}.{inner}"] = _hashable(v)
        else:
            flat[key] = _hashable(value)
    return flat


def _hashable(value: Any) -> Any:
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value
