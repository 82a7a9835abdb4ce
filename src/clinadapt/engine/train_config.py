"""What a training run is given (``TrainConfig``) and what it returns (``TrainResult``).

Kept apart from ``engine.train`` so the epoch loop (``engine.loop``) and the runners can use them
without importing the training entry point.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from clinadapt.engine.augment import AUGMENTS
from clinadapt.engine.schedule import OPTIMIZERS, SCHEDULES
from clinadapt.errors import ConfigError
from clinadapt.registry import did_you_mean
from clinadapt.tasks import TASKS

SELECT_METRICS = tuple(dict.fromkeys(m for name in TASKS for m in TASKS.get(name).select_metrics))
"""What any task can choose its best epoch by; ``train`` checks the run's task offers it."""
CLASS_BALANCE = ("none", "weights", "sampler")
TRAIN_PRECISIONS = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("auto", "cpu")
EpochCallback = Callable[[int, dict[str, Any]], None]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class TrainConfig:
    """How to train; every field is part of the checkpoint's config hash except num_workers and
    compile, which change how fast a run trains, not what it trains."""

    epochs: int = field(default=20, metadata=_help("training epochs"))
    batch_size: int = field(default=32, metadata=_help("examples per step and process"))
    lr: float = field(default=1e-3, metadata=_help("peak learning rate"))
    weight_decay: float = field(
        default=0.05, metadata=_help("weight decay (not applied to biases and norm weights)")
    )
    optimizer: str = field(default="adamw", metadata=_help("adamw | adam | sgd"))
    momentum: float = field(default=0.9, metadata=_help("SGD momentum (Nesterov when > 0)"))
    schedule: str = field(
        default="cosine",
        metadata=_help(
            "cosine (linear warm-up, then cosine to 0) | step (x gamma at milestones) | constant"
        ),
    )
    warmup_epochs: float = field(default=1.0, metadata=_help("warm-up length for cosine"))
    milestones: tuple[int, ...] = field(
        default=(50, 75), metadata=_help("epochs where the step schedule multiplies lr by gamma")
    )
    gamma: float = field(default=0.1, metadata=_help("step schedule decay factor"))
    grad_accumulation: int = field(
        default=1, metadata=_help("batches whose gradients are summed per optimiser step")
    )
    clip_grad_norm: float = field(
        default=1.0, metadata=_help("maximum gradient norm; 0 disables clipping")
    )
    early_stopping_patience: int = field(
        default=5, metadata=_help("evaluations without improvement before stopping; 0 disables")
    )
    select_metric: str = field(
        default="auc",
        metadata=_help(
            "validation metric choosing the best epoch: auc | acc | balanced_accuracy | loss "
            "(classification), dice | loss (segmentation, the default there)"
        ),
    )
    class_balance: str = field(
        default="none",
        metadata=_help("none | weights (class-weighted loss) | sampler (class-balanced sampling)"),
    )
    label_smoothing: float = field(default=0.0, metadata=_help("label smoothing in [0, 1)"))
    norm_statistics: str = field(
        default="auto",
        metadata=_help(
            "batch-norm running statistics while training: update | frozen (eval mode; scale and "
            "shift still train) | auto (frozen for pretrained backbones, update from scratch)"
        ),
    )
    precision: str = field(
        default="auto",
        metadata=_help(
            "auto (bf16 where native and the first batch's features agree with fp32) | bf16 | "
            "fp16 (CUDA, with a GradScaler) | fp32"
        ),
    )
    device: str = field(
        default="auto", metadata=_help("auto (a GPU when present, via accelerate) | cpu")
    )
    gradient_checkpointing: bool | str = field(
        default="auto",
        metadata=_help(
            "recompute each block's activations in the backward pass to save memory (timm "
            "models; the same weights): true | false | auto (on where a method freezes part of "
            "the model and no batch norm updates its statistics, off for full fine-tuning)"
        ),
    )
    augment: str = field(
        default="auto",
        metadata=_help("auto (light; plus mild colour for RGB) | none | light | medium"),
    )
    augment_options: dict[str, Any] = field(
        default_factory=dict, metadata=_help("overrides of AugmentConfig fields, e.g. vflip: 0.5")
    )
    max_slices: int = field(
        default=0, metadata=_help("volumes: axial slices per volume, evenly spread; 0 for all")
    )
    seed: int = field(default=0, metadata=_help("seed of sampling, augmentation and dropout"))
    deterministic: bool = field(
        default=True, metadata=_help("deterministic algorithms (reproducible, a little slower)")
    )
    num_workers: int = field(default=0, metadata=_help("data-loading worker processes"))
    compile: bool = field(
        default=False,
        metadata=_help(
            "torch.compile the model for training (pays on GPUs; measured no faster for the "
            "MedMNIST ResNet-18 on a 2-core CPU, benchmarks/results/epoch.json)"
        ),
    )
    eval_every: int = field(default=1, metadata=_help("validate every this many epochs"))

    def __post_init__(self) -> None:
        for key, choices in (
            ("optimizer", OPTIMIZERS),
            ("schedule", SCHEDULES),
            ("select_metric", SELECT_METRICS),
            ("class_balance", CLASS_BALANCE),
            ("precision", TRAIN_PRECISIONS),
            ("device", DEVICES),
            ("augment", AUGMENTS),
        ):
            value = getattr(self, key)
            if value not in choices:
                raise ConfigError(
                    f"{key}={value!r} is not one of {list(choices)}."
                    f"{did_you_mean(str(value), list(choices))}"
                )
        for key in ("epochs", "batch_size", "grad_accumulation", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("lr", "weight_decay", "clip_grad_norm", "warmup_epochs", "momentum"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        for key in ("early_stopping_patience", "max_slices", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key} must not be negative, got {getattr(self, key)}")
        if not (
            isinstance(self.gradient_checkpointing, bool) or self.gradient_checkpointing == "auto"
        ):
            raise ConfigError(
                "gradient_checkpointing must be true, false or auto, got "
                f"{self.gradient_checkpointing!r}"
            )
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma must be in (0, 1], got {self.gamma}")


@dataclass
class TrainResult:
    """What a run record needs; ``history`` has one dict per epoch (epoch, train_loss, lr,
    val_* metrics when validated, seconds)."""

    best_epoch: int
    best_val: dict[str, Any]
    history: list[dict[str, Any]]
    time_per_epoch_s: float
    throughput: dict[str, Any]  # engine.flops.throughput of the training steps
    total_s: float
    peak_memory_mb: float
    stopped_early: bool
    precision: str
    trainable_parameters: int
    precision_check: dict[str, Any] | None = None  # PrecisionDecision.to_dict()
    gradient_checkpointing: bool = False  # whether the run recomputed activations

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
