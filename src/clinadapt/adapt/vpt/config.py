"""Options of the ``vpt`` method."""

from __future__ import annotations

from dataclasses import dataclass, field

from clinadapt.errors import ConfigError


@dataclass
class VPTConfig:
    num_tokens: int = field(default=10, metadata={"help": "learnable prompt tokens per layer"})
    deep: bool = field(
        default=False,
        metadata={
            "help": "VPT-deep: new prompts at every block; false: VPT-shallow, prompts at the "
            "input only"
        },
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout on the prompt tokens (the paper sweeps 0.1)"}
    )

    def __post_init__(self) -> None:
        if self.num_tokens < 1:
            raise ConfigError(f"vpt: num_tokens must be at least 1, got {self.num_tokens}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"vpt: dropout must be in [0, 1), got {self.dropout}")
