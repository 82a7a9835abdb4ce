"""Work counted in floating-point operations, so that a speed reads against what the hardware
can do (images/s alone hides whether a model is cheap or the code is slow).

Counts come from ``torch.utils.flop_counter`` (matrix multiplications, convolutions and
attention, two FLOPs per multiply-add; normalisation and element-wise work are not counted).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from torch.utils.flop_counter import FlopCounterMode


class FlopCount:
    """What a ``counting_flops`` block did; ``total`` is set when the block ends."""

    total: int = 0


@contextlib.contextmanager
def counting_flops() -> Iterator[FlopCount]:
    """Count the FLOPs of everything run in the block, backward passes included."""
    count = FlopCount()
    with FlopCounterMode(display=False) as counter:
        yield count
    count.total = int(counter.get_total_flops())


def throughput(examples: float, seconds: float, flops_per_example: float | None) -> dict[str, Any]:
    """Examples per second and, where FLOPs were counted, TFLOP/s."""
    rate = examples / seconds if seconds > 0 else float("nan")
    tflops = None if not flops_per_example else rate * flops_per_example / 1e12
    return {"examples_per_s": rate, "flops_per_example": flops_per_example, "tflop_per_s": tflops}
