"""Options of the ``lora`` method."""

from __future__ import annotations

from dataclasses import dataclass, field

from clinadapt.errors import ConfigError


@dataclass
class LoRAConfig:
    r: int = field(default=8, metadata={"help": "rank of the low-rank update B @ A"})
    alpha: float = field(
        default=16.0, metadata={"help": "scaling numerator: the update is (alpha / r) * B @ A"}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout on the input of the low-rank branch"}
    )
    target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "module names (or name suffixes, e.g. qkv) to adapt; default: chosen per "
            "architecture (attention + MLP linears for transformers, non-stem convs for CNNs)"
        },
    )

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora: r must be at least 1, got {self.r}")
        if not self.alpha > 0:
            raise ConfigError(f"lora: alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora: dropout must be in [0, 1), got {self.dropout}")
        if self.target_modules is not None:
            if isinstance(self.target_modules, str):
                self.target_modules = [self.target_modules]
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(
                isinstance(t, str) and t.strip() for t in self.target_modules
            ):
                raise ConfigError(
                    "lora: target_modules must be a non-empty list of module names, or null "
                    f"for the per-architecture default; got {self.target_modules!r}"
                )
