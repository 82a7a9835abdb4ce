"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers", ICCV):
a student matches, on every crop, a teacher's output on the global crops; the teacher is an
exponential moving average of the student, so no labels and no negatives are needed."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from clinadapt.errors import ConfigError
from clinadapt.ssl.base import SSL_METHODS, PretrainModel
from clinadapt.ssl.heads import DINOHead
from clinadapt.ssl.losses import DINOLoss


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class DINOConfig:
    out_dim: int = field(default=4096, metadata=_help("prototypes (the paper: 65536)"))
    hidden_dim: int = field(default=1024, metadata=_help("head hidden width"))
    bottleneck_dim: int = field(default=256, metadata=_help("head bottleneck width"))
    head_layers: int = field(default=3, metadata=_help("head layers before the prototypes"))
    norm_last_layer: bool = field(default=True, metadata=_help("fix prototype lengths at 1"))
    student_temp: float = field(default=0.1, metadata=_help("student temperature"))
    teacher_temp: float = field(default=0.04, metadata=_help("teacher temperature"))
    warmup_teacher_temp: float = field(default=0.04, metadata=_help("initial teacher temp"))
    warmup_teacher_temp_epochs: int = field(default=0, metadata=_help("teacher temp warm-up"))
    center_momentum: float = field(default=0.9, metadata=_help("centre EMA momentum"))
    momentum_teacher: float = field(
        default=0.996, metadata=_help("teacher EMA momentum, raised to 1 on a cosine")
    )
    freeze_last_layer_epochs: int = field(
        default=1, metadata=_help("epochs the prototypes stay fixed at the start")
    )

    def __post_init__(self) -> None:
        for key in ("out_dim", "hidden_dim", "bottleneck_dim", "head_layers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if not 0 <= self.momentum_teacher <= 1:
            raise ConfigError(f"momentum_teacher must be in [0, 1], got {self.momentum_teacher}")
        for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        if not 0 <= self.center_momentum < 1:
            raise ConfigError(f"center_momentum must be in [0, 1), got {self.center_momentum}")


class DINO(PretrainModel):
    config_cls = DINOConfig
    description = "DINO (Caron et al. 2021): self-distillation, EMA teacher, multi-crop"
    views = "dino"

    def __init__(self, encoder: nn.Module, feature_dim: int, config: DINOConfig) -> None:
        super().__init__(encoder, feature_dim, config)
        self.head = DINOHead(
            feature_dim,
            config.out_dim,
            config.hidden_dim,
            config.bottleneck_dim,
            config.head_layers,
            config.norm_last_layer,
        )
        self.teacher = copy.deepcopy(encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.loss = DINOLoss(
            config.out_dim,
            student_temp=config.student_temp,
            teacher_temp=config.teacher_temp,
            warmup_teacher_temp=config.warmup_teacher_temp,
            warmup_teacher_temp_epochs=config.warmup_teacher_temp_epochs,
            center_momentum=config.center_momentum,
        )

    def forward(self, views: list[torch.Tensor], epoch: int = 0) -> torch.Tensor:
        if len(views) < 2:
            raise ConfigError(f"dino needs at least two global views, got {len(views)}")
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher(torch.cat(views[:2]))).chunk(2)
        student: list[torch.Tensor] = []
        for group in _same_size_runs(views):  # one pass per crop size
            out = self.head(self.encoder(torch.cat(group)))
            student.extend(out.chunk(len(group)))
        return self.loss(student, list(teacher), epoch)

    def before_optimizer_step(self, epoch: int) -> None:
        if epoch < self.config.freeze_last_layer_epochs:
            for p in self.head.last_layer_parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, progress: float) -> None:
        """Teacher <- m * teacher + (1 - m) * student, m rising to 1 on a cosine (the paper)."""
        m0 = self.config.momentum_teacher
        m = 1 - (1 - m0) * (math.cos(math.pi * min(max(progress, 0.0), 1.0)) + 1) / 2
        for student, teacher in ((self.encoder, self.teacher), (self.head, self.teacher_head)):
            params = dict(teacher.named_parameters())
            for name, p in student.named_parameters():
                if p.requires_grad:
                    params[name].mul_(m).add_(p.detach(), alpha=1 - m)


def _same_size_runs(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    runs: list[list[torch.Tensor]] = []
    for v in views:
        if runs and runs[-1][0].shape == v.shape:
            runs[-1].append(v)
        else:
            runs.append([v])
    return runs


SSL_METHODS.register("dino", DINO)
