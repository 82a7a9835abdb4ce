"""Options of the ``adapter`` method."""

from __future__ import annotations

from dataclasses import dataclass, field

from clinadapt.errors import ConfigError

STYLES = ("parallel", "sequential")


@dataclass
class AdapterConfig:
    bottleneck: int = field(
        default=64,
        metadata={"help": "bottleneck width of each adapter (capped at the width it adapts)"},
    )
    scale: float = field(
        default=1.0, metadata={"help": "the adapter's output is multiplied by this factor"}
    )
    dropout: float = field(
        default=0.0, metadata={"help": "dropout between the down- and up-projection"}
    )
    style: str = field(
        default="parallel",
        metadata={
            "help": "transformers: 'parallel' to each block's MLP (AdaptFormer) or "
            "'sequential' after it (Houlsby); CNN stages always get a residual adapter"
        },
    )

    def __post_init__(self) -> None:
        if self.bottleneck < 1:
            raise ConfigError(f"adapter: bottleneck must be at least 1, got {self.bottleneck}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter: dropout must be in [0, 1), got {self.dropout}")
        if self.style not in STYLES:
            raise ConfigError(f"adapter: style must be one of {list(STYLES)}, got {self.style!r}")
