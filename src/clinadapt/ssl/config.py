"""What ``clinadapt pretrain`` does, as one dataclass: data, backbone, method, optimisation,
monitoring. Every field but ``num_workers`` and ``resume`` is part of the checkpoint's config
hash, so a resumed run cannot silently change course."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from clinadapt.errors import ConfigError
from clinadapt.registry import did_you_mean


def _help(text: str) -> dict[str, str]:
    return {"help": text}


PRECISIONS = ("auto", "bf16", "fp16", "fp32")
NORM_STATISTICS = ("auto", "update", "frozen")


@dataclass
class PretrainConfig:
    data: str = field(
        default="synthetic-binary",
        metadata=_help(
            "comma-separated datasets whose training splits are pooled, labels ignored (MedMNIST "
            "names, synthetic-*, image folders, CSV manifests, NIfTI folders)"
        ),
    )
    data_root: str | None = field(
        default=None, metadata=_help("folder with the .npz files (default: $CLINADAPT_DATA)")
    )
    size: int = field(default=28, metadata=_help("MedMNIST image size: 28, 64, 128 or 224"))
    backbone: str = field(default="test_cnn", metadata=_help("backbone name or timm:<name>"))
    weights: str = field(
        default="none",
        metadata=_help("none (from scratch), pretrained (continue a hub model) or a path"),
    )
    method: str = field(default="simclr", metadata=_help("simclr | dino | mae"))
    method_options: dict[str, Any] = field(
        default_factory=dict, metadata=_help("options of the method's config (method.NAME=VALUE)")
    )
    view_options: dict[str, Any] = field(
        default_factory=dict,
        metadata=_help("overrides of the method's view preset (views.NAME=VALUE)"),
    )
    lora_rank: int = field(
        default=0,
        metadata=_help("continue pretraining through LoRA of this rank (0: train the backbone)"),
    )
    lora_alpha: float = field(default=16.0, metadata=_help("LoRA scaling numerator"))
    epochs: int = field(default=100, metadata=_help("passes over the pooled training images"))
    batch_size: int = field(default=64, metadata=_help("images per step and process"))
    lr: float = field(default=1e-3, metadata=_help("peak learning rate (AdamW)"))
    weight_decay: float = field(
        default=0.05, metadata=_help("weight decay (not applied to biases and norm weights)")
    )
    warmup_epochs: float = field(default=1.0, metadata=_help("linear warm-up before the cosine"))
    clip_grad_norm: float = field(default=3.0, metadata=_help("gradient norm limit; 0: none"))
    norm_statistics: str = field(
        default="auto",
        metadata=_help(
            "batch-norm statistics: update | frozen | auto (frozen when continuing a pretrained "
            "model, whose statistics describe its pretraining data)"
        ),
    )
    resize: str = field(default="bilinear", metadata=_help("nearest, bilinear or pad"))
    input_size: int | None = field(
        default=None, metadata=_help("backbone input size (default: its pretrained size)")
    )
    precision: str = field(
        default="auto",
        metadata=_help(
            "auto (bf16 where native and the encoder's features of the first batch agree with "
            "fp32) | bf16 | fp32"
        ),
    )
    device: str = field(default="auto", metadata=_help("auto | cpu"))
    seed: int = field(default=0, metadata=_help("seed of sampling, views and initialisation"))
    deterministic: bool = field(
        default=True, metadata=_help("deterministic kernels (reproducible resumes)")
    )
    monitor: str = field(
        default="auto",
        metadata=_help(
            "labelled dataset for the online k-NN score (train split as memory, val split as "
            "queries): auto (the first dataset of data with labels), none, or a name"
        ),
    )
    monitor_every: int = field(default=1, metadata=_help("k-NN score every this many epochs"))
    monitor_max_train: int = field(
        default=2000, metadata=_help("at most this many memory images for the k-NN score")
    )
    trust_pickle: bool = field(
        default=False, metadata=_help("allow loading pickle (.pt/.pth/.bin) checkpoints")
    )
    resume: bool = field(default=False, metadata=_help("continue an interrupted run"))
    num_workers: int = field(default=0, metadata=_help("data-loading worker processes"))

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise ConfigError(f"seed must not be negative, got {self.seed}")
        for key, choices in (("precision", PRECISIONS), ("norm_statistics", NORM_STATISTICS)):
            value = getattr(self, key)
            if value not in choices:
                raise ConfigError(
                    f"{key}={value!r} is not one of {list(choices)}."
                    f"{did_you_mean(str(value), list(choices))}"
                )
        if self.device not in ("auto", "cpu"):
            raise ConfigError(f"device must be auto or cpu, got {self.device!r}")
        for key in ("epochs", "monitor_every", "monitor_max_train"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.batch_size < 2:
            raise ConfigError("batch_size must be at least 2 (contrastive losses need pairs)")
        for key in ("lr", "weight_decay", "warmup_epochs", "clip_grad_norm", "lora_rank"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        if not self.datasets:
            raise ConfigError("data names no dataset; give one or more, comma-separated")

    @property
    def datasets(self) -> list[str]:
        return [d.strip() for d in str(self.data).split(",") if d.strip()]
