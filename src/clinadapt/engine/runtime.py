"""Process-wide settings of a training run: the accelerate session and deterministic kernels.

Shared by supervised training (``engine.train``) and self-supervised pretraining
(``ssl.loop``), so both run the same way on a CPU, one GPU, or under ``accelerate launch``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator


def _has_accelerator() -> bool:
    return torch.cuda.is_available() or (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    )


@contextlib.contextmanager
def accelerator_session(
    precision: str, device: str = "auto", grad_accumulation: int = 1
) -> Iterator[Accelerator]:
    """An Accelerator for this run; its process-wide state is reset afterwards so the next
    run in the same process may use another precision (the process group is kept)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    accelerator = Accelerator(
        mixed_precision={"fp32": "no"}.get(precision, precision),
        gradient_accumulation_steps=grad_accumulation,
        # without an accelerator, "auto" must say cpu: accelerate only sets up multi-process
        # CPU training (torchrun / accelerate launch) when asked for the CPU explicitly
        cpu=device == "cpu" or not _has_accelerator(),
    )
    try:
        yield accelerator
    finally:
        if accelerator.device.type != "cpu":  # gc + empty the GPU cache for the next run
            accelerator.free_memory()
        AcceleratorState._reset_state()
        GradientState._reset_state()


@contextlib.contextmanager
def deterministic_kernels(enabled: bool) -> Iterator[None]:
    """Deterministic kernels for the run (warn-only: an op without one still runs)."""
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        cudnn.benchmark,
        cudnn.deterministic,
    )
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)
    cudnn.benchmark, cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        cudnn.benchmark, cudnn.deterministic = before[2], before[3]
