"""``clinadapt align``: give an image-only backbone a text side (LiT-style locked-text tuning,
``clinadapt.text.align``), ending in a weights folder that every command takes as ``--weights``
with the same ``--backbone``; vision-language methods then find its text side there.

With a frozen backbone only the projection trains, on the cached features of the pooled training
splits (seconds once the features exist); ``lora_rank`` > 0 also trains LoRA layers of the
backbone on the images (BN statistics kept), and the folder then holds the merged weights.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clinadapt.config import to_dict
from clinadapt.errors import ConfigError, DataError

ALIGN_RECORD = "alignment.json"


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class AlignConfig:
    datasets: str = field(
        default="pneumoniamnist,breastmnist,retinamnist",
        metadata=_help(
            "comma-separated single-label classification datasets whose training splits are "
            "pooled (MedMNIST names, image folders, CSV manifests)"
        ),
    )
    data_root: str | None = field(
        default=None, metadata=_help("folder with the .npz files (default: $CLINADAPT_DATA)")
    )
    size: int = field(default=28, metadata=_help("MedMNIST image size: 28, 64, 128 or 224"))
    backbone: str = field(default="resnet18", metadata=_help("image backbone (timm or ours)"))
    weights: str = field(
        default="pretrained", metadata=_help("pretrained (hub), none, or a weights path")
    )
    class_text: str | None = field(
        default=None,
        metadata=_help(
            "class-text files of datasets without built-in text: DATASET=FILE[,DATASET=FILE], "
            "or one FILE when one dataset is aligned"
        ),
    )
    text_encoder: str = field(
        default="minilm",
        metadata=_help(
            "the locked text encoder: minilm (offline), biolord, pubmedbert, "
            "sentence-transformers:<repo> or open_clip:<ref>"
        ),
    )
    text: str = field(
        default="both",
        metadata=_help("phrases that fill the templates: names, descriptions or both"),
    )
    epochs: int = field(default=30, metadata=_help("passes over the pooled training images"))
    batch_size: int = field(default=256, metadata=_help("images per step"))
    lr: float = field(default=1e-3, metadata=_help("AdamW learning rate (cosine decay)"))
    weight_decay: float = field(default=1e-4, metadata=_help("AdamW weight decay"))
    logit_scale: float = field(
        default=1 / 0.07, metadata=_help("starting logit scale (CLIP's 1/0.07)")
    )
    learn_scale: bool = field(default=True, metadata=_help("learn the logit scale (max 100)"))
    lora_rank: int = field(
        default=0,
        metadata=_help("also train LoRA layers of this rank in the backbone (0: frozen backbone)"),
    )
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA scaling numerator"))
    resize: str = field(
        default="auto", metadata=_help("nearest, bilinear or pad (auto: nearest, as runs)")
    )
    input_size: int | None = field(
        default=None, metadata=_help("backbone input size (default: its pretrained size)")
    )
    precision: str = field(
        default="auto", metadata=_help("feature extraction: auto, bf16 or fp32 (LoRA: fp32)")
    )
    seed: int = field(default=0, metadata=_help("seed of the projection and the batches"))
    cache_dir: str | None = field(
        default=None, metadata=_help("feature cache (default: $CLINADAPT_CACHE)")
    )
    trust_pickle: bool = field(
        default=False, metadata=_help("allow loading pickle (.pt/.pth/.bin) checkpoints")
    )

    def __post_init__(self) -> None:
        from clinadapt.data.class_text import USES

        if not self.names:
            raise ConfigError("datasets names no dataset; give one or more, comma-separated")
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"datasets lists a dataset twice: {self.datasets!r}")
        if self.text not in USES:
            raise ConfigError(f"text must be one of {list(USES)}, got {self.text!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.lora_rank < 0:
            raise ConfigError(
                f"epochs and batch_size must be positive and lora_rank >= 0, got {self.epochs}, "
                f"{self.batch_size}, {self.lora_rank}"
            )
        if not (self.lr > 0 and self.weight_decay >= 0 and 0 < self.logit_scale <= 100):
            raise ConfigError(
                f"lr must be > 0, weight_decay >= 0 and logit_scale in (0, 100], got {self.lr}, "
                f"{self.weight_decay}, {self.logit_scale}"
            )
        self.class_text_files()

    @property
    def names(self) -> list[str]:
        return [d.strip() for d in str(self.datasets).split(",") if d.strip()]

    def class_text_files(self) -> dict[str, str]:
        """Dataset -> class-text file, from ``class_text``."""
        if not self.class_text:
            return {}
        items = [i.strip() for i in str(self.class_text).split(",") if i.strip()]
        if len(items) == 1 and "=" not in items[0]:
            if len(self.names) != 1:
                raise ConfigError(
                    f"class_text {self.class_text!r} names no dataset, and {len(self.names)} are "
                    "aligned: give DATASET=FILE for each that needs one"
                )
            return {self.names[0]: items[0]}
        files = dict(i.split("=", 1) for i in items if "=" in i)
        bad = [i for i in items if "=" not in i] + sorted(set(files) - set(self.names))
        if bad:
            raise ConfigError(
                f"class_text entry {bad[0]!r} is not DATASET=FILE for one of {self.names}"
            )
        return files


def check_align_options(cfg: AlignConfig) -> None:
    """Before any data is read: the backbone can be aligned, and registered datasets are
    single-label with class text."""
    from clinadapt.backbones import get_spec
    from clinadapt.data.registry import DATASETS

    spec = get_spec(cfg.backbone)
    if spec.library == "open_clip":
        raise ConfigError(
            f"backbone {cfg.backbone!r} is a vision-language model with its own text side; use "
            "it directly (zeroshot, coop, tip_adapter) instead of aligning it"
        )
    if spec.ndim != 2:
        raise ConfigError(
            f"backbone {cfg.backbone!r} takes 3D volumes; align works on 2D image backbones"
        )
    files = cfg.class_text_files()
    for name in cfg.names:
        if name in DATASETS:
            _check_single_label(DATASETS.get(name))
            _class_text(DATASETS.get(name), files.get(name))


def _class_text(info: Any, file: str | None) -> Any:
    """The class text of a dataset, the error saying how ``align`` takes a file."""
    from clinadapt.data.class_text import class_text_for

    try:
        return class_text_for(info, file)
    except ConfigError as err:
        if file is not None:
            raise
        raise ConfigError(
            f"{err}\nFor align, pass it as --class-text {info.name}=FILE (class_text="
            f"{info.name}=FILE), comma-separated for several datasets"
        ) from None


def _check_single_label(info: Any) -> None:
    if not info.task.single_label or info.ndim != 2:
        kind = "3D volumes" if info.ndim != 2 else f"a {info.task.value} task"
        raise DataError(
            f"dataset {info.name!r} holds {kind}; align pairs each 2D image with the text of its "
            "one class (single-label: binary, multi-class or ordinal)"
        )


def run_align(cfg: AlignConfig, out: Path, *, progress: bool = True) -> dict[str, Any]:
    """Align ``cfg.backbone`` to ``cfg.text_encoder``; write the weights folder ``out`` (its
    files and ``alignment.json``) and return the record."""
    from clinadapt.backbones import get_spec
    from clinadapt.runner.common import backbone_summary, dataset_summary
    from clinadapt.runner.experiment import prepare_features
    from clinadapt.runner.records import build_record, write_json_atomic
    from clinadapt.text import create_text_encoder
    from clinadapt.text.align import (
        AlignSettings,
        make_projector,
        pool_classes,
        prompt_bank,
        save_text_side,
        train_projector,
    )

    start = time.perf_counter()
    check_align_options(cfg)
    encoder = create_text_encoder(cfg.text_encoder)
    files = cfg.class_text_files()
    bundles = {}
    for name in cfg.names:
        bundle = prepare_features(_experiment(cfg, name), progress=progress)
        _check_single_label(bundle.info)
        if "train" not in bundle.features or len(bundle.labels["train"]) == 0:
            raise DataError(f"dataset {name!r} has no training images to align on")
        bundles[name] = bundle
    texts = {name: _class_text(b.info, files.get(name)) for name, b in bundles.items()}
    pooled = pool_classes(texts, cfg.text)
    bank = prompt_bank(encoder.encode, pooled)
    x = torch.cat([torch.from_numpy(b.features["train"]).float() for b in bundles.values()])
    y = torch.cat(
        [torch.from_numpy(pooled.index[n][b.labels["train"][:, 0]]) for n, b in bundles.items()]
    )
    settings = AlignSettings(
        cfg.epochs,
        cfg.batch_size,
        cfg.lr,
        cfg.weight_decay,
        cfg.logit_scale,
        cfg.learn_scale,
        cfg.seed,
    )
    projector = make_projector(x, encoder.dim, settings)
    monitor = _val_monitor(bundles, pooled, bank, projector)
    backbone = next(iter(bundles.values())).source.backbone
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    lora_targets: list[str] = []
    if cfg.lora_rank:
        batches, extra, lora_targets = _lora_batches(cfg, bundles, pooled, backbone)
        history = train_projector(
            projector, batches, bank, settings, extra=extra, progress=progress
        )
    else:
        history = train_projector(
            projector,
            _feature_batches(x, y, cfg.batch_size),
            bank,
            settings,
            monitor=monitor,
            progress=progress,
        )
    train_s = time.perf_counter() - start
    spec = get_spec(cfg.backbone)
    summary = {
        "datasets": cfg.names,
        "text_encoder": cfg.text_encoder,
        "text": cfg.text,
        "epochs": cfg.epochs,
        "lora_rank": cfg.lora_rank,
        "started_from": cfg.weights,
    }
    out.mkdir(parents=True, exist_ok=True)
    weights_sha = _write_backbone(out, cfg, backbone, spec, summary)
    save_text_side(
        out, projector.folded(), float(projector.scale.detach()), cfg.text_encoder, encoder, summary
    )
    record = build_record(
        "align",
        to_dict(cfg),
        data=[
            dataset_summary(b.info, {k: len(v) for k, v in b.labels.items()}, b.provenance)
            for b in bundles.values()
        ],
        train_images=len(y),
        backbone=backbone_summary(
            backbone, cfg.weights, sum(p.numel() for p in backbone.parameters())
        ),
        preprocessing={n: b.preprocessing for n, b in bundles.items()},
        text={
            "encoder": encoder.describe(),
            "datasets": {n: t.describe(cfg.text) for n, t in texts.items()},
            "pooled": pooled.describe(),
        },
        method={
            "name": "align",
            "loss": "symmetric contrastive, class text as captions (LiT, locked text)",
            "trainable_parameters": sum(p.numel() for p in projector.parameters())
            + sum(p.numel() for p in backbone.parameters() if p.requires_grad),
            "lora_targets": lora_targets,
            "logit_scale": float(projector.scale.detach()),
        },
        history=history,
        output={"weights": str(out), "model_sha256": weights_sha},
        feature_cache_hits={n: b.cache_hits for n, b in bundles.items()},
        timings={
            "setup_s": setup_s,
            "setup_key": str(out),
            "features_s": {n: b.timings for n, b in bundles.items()},
            "train_s": train_s,
            "time_per_epoch_s": train_s / cfg.epochs,
            "run_s": train_s,
        },
    )
    write_json_atomic(out / ALIGN_RECORD, record)
    return record


def _experiment(cfg: AlignConfig, dataset: str) -> Any:
    """The feature-extraction options of one dataset, as a run would have them (so the feature
    cache is shared with later runs)."""
    from clinadapt.runner.experiment import ExperimentConfig

    return ExperimentConfig(
        dataset=dataset,
        data_root=cfg.data_root,
        size=cfg.size,
        backbone=cfg.backbone,
        weights=cfg.weights,
        resize=cfg.resize,
        input_size=cfg.input_size,
        precision=cfg.precision,
        cache_dir=cfg.cache_dir,
        trust_pickle=cfg.trust_pickle,
    )


def _feature_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Any:
    def batches(generator: torch.Generator) -> Any:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            yield x[rows], y[rows]

    return batches


def _val_monitor(bundles: dict[str, Any], pooled: Any, bank: list, projector: Any) -> Any:
    """Zero-shot accuracy on each validation split after every epoch (each dataset against its
    own classes' text, as ``zeroshot`` runs classify): watched, never used to choose."""
    from torch.nn import functional as F

    checks = []
    for name, b in bundles.items():
        if "val" not in b.features or not len(b.labels["val"]):
            continue
        classes = F.normalize(
            torch.stack([F.normalize(bank[c].mean(dim=0), dim=0) for c in pooled.index[name]]),
            dim=-1,
        )
        checks.append(
            (name, torch.from_numpy(b.features["val"]).float(), b.labels["val"][:, 0], classes)
        )

    def monitor() -> dict[str, float]:
        row = {}
        for name, xv, yv, classes in checks:
            predicted = (projector(xv) @ classes.T).argmax(dim=1).numpy()
            row[f"val_zero_shot_acc/{name}"] = float(np.mean(predicted == yv))
        if row:
            row["val_zero_shot_acc"] = float(np.mean(list(row.values())))
        return row

    return monitor


def _lora_batches(
    cfg: AlignConfig, bundles: dict[str, Any], pooled: Any, backbone: Any
) -> tuple[Any, list[torch.nn.Parameter], list[str]]:
    """Batches of training images through the backbone with LoRA layers, in fp32; the
    backbone's norm layers stay in eval mode (their statistics describe its pretraining)."""
    from clinadapt.runner.pretrain import with_lora

    model, targets = with_lora(backbone.model, cfg.lora_rank, cfg.lora_alpha, backbone.name)
    backbone.model = model.eval()
    extra = [p for p in model.parameters() if p.requires_grad]
    parts = [
        (b.source.images["train"], b.source.preprocess, pooled.index[n][b.labels["train"][:, 0]])
        for n, b in bundles.items()
    ]
    owner = np.concatenate([np.full(len(p[2]), i) for i, p in enumerate(parts)])
    row = np.concatenate([np.arange(len(p[2])) for p in parts])

    def batches(generator: torch.Generator) -> Any:
        order = torch.randperm(len(owner), generator=generator).numpy()
        for start in range(0, len(order), cfg.batch_size):
            picked = order[start : start + cfg.batch_size]
            xs, ys = [], []
            for i, (images, preprocess, pooled_y) in enumerate(parts):
                rows = np.sort(row[picked[owner[picked] == i]])
                if len(rows):
                    xs.append(backbone.embed(preprocess(np.asarray(images[rows]))).float())
                    ys.append(torch.from_numpy(pooled_y[rows]))
            yield torch.cat(xs), torch.cat(ys)

    return batches, extra, targets


def _write_backbone(
    out: Path, cfg: AlignConfig, backbone: Any, spec: Any, summary: dict[str, Any]
) -> str:
    """``model.safetensors`` and ``config.json`` that ``create_backbone(cfg.backbone, out)``
    builds. A frozen backbone from a local safetensors file is copied byte for byte (runs on the
    aligned folder then share the original's cached features); otherwise the backbone's weights
    (LoRA merged) are written. Returns the weights file's sha256."""
    from clinadapt.backbones.weights import (
        CONFIG_FILE,
        WEIGHTS_FILE,
        file_sha256,
        resolve_local_weights,
    )
    from clinadapt.engine.checkpoint import save_safetensors
    from clinadapt.runner.pretrain import plain_encoder
    from clinadapt.runner.records import write_json_atomic

    local = None
    if cfg.weights not in ("pretrained", "none"):
        local = resolve_local_weights(Path(cfg.weights).expanduser())
    target = out / WEIGHTS_FILE
    if not cfg.lora_rank and local is not None and local.file.suffix == ".safetensors":
        kwargs = local.create_kwargs
        if local.file.resolve() != target.resolve():
            shutil.copyfile(local.file, target)
    else:
        kwargs = {**spec.kwargs, **(local.create_kwargs if local else {})}
        kwargs.pop("num_classes", None)
        plain = plain_encoder(backbone.model)
        state = {k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()}
        tmp = out / f".{WEIGHTS_FILE}.tmp"
        save_safetensors(state, tmp)
        tmp.replace(target)
    pcfg = backbone.pretrained_cfg
    write_json_atomic(
        out / CONFIG_FILE,
        {
            "architecture": spec.model_name,
            "create_model_kwargs": kwargs,
            "num_features": backbone.feature_dim,
            "input_size": [
                pcfg.channels,
                cfg.input_size or pcfg.input_size,
                cfg.input_size or pcfg.input_size,
            ],
            "mean": list(pcfg.mean),
            "std": list(pcfg.std),
            "interpolation": pcfg.interpolation,
            "alignment": summary,
        },
    )
    return file_sha256(target)
