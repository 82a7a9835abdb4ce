"""The self-distillation loss of DINO (Caron et al. 2021, "Emerging Properties in
Self-Supervised Vision Transformers", ICCV).

The student's softmax over K prototypes, on every view, must match the teacher's on each global
view of the same image (never the same view). The teacher's outputs are centred (a running
mean, which keeps one prototype from taking over) and sharpened (a low temperature, which keeps
the output from going uniform); the two together avoid collapse without negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOLoss(nn.Module):
    """Cross-entropy between sharpened, centred teacher outputs and student outputs.

    ``teacher_temp`` rises linearly from ``warmup_teacher_temp`` over the first
    ``warmup_teacher_temp_epochs`` epochs (the paper's recipe against early instability). The
    centre is a buffer, so it is saved and restored with the model.
    """

    def __init__(
        self,
        out_dim: int,
        *,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        center_momentum: float = 0.9,
    ) -> None:
        super().__init__()
        for name, value in (("student_temp", student_temp), ("teacher_temp", teacher_temp)):
            if value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if not 0 <= center_momentum < 1:
            raise ValueError(f"center_momentum must be in [0, 1), got {center_momentum}")
        self.student_temp, self.teacher_temp = student_temp, teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def teacher_temperature(self, epoch: int) -> float:
        """The teacher temperature of (0-based) ``epoch``."""
        warm = self.warmup_teacher_temp_epochs
        if epoch >= warm:
            return self.teacher_temp
        step = (self.teacher_temp - self.warmup_teacher_temp) / warm
        return self.warmup_teacher_temp + step * epoch

    def forward(
        self, student: list[torch.Tensor], teacher: list[torch.Tensor], epoch: int = 0
    ) -> torch.Tensor:
        """``student``: one (B, K) output per view, the global views first; ``teacher``: one per
        global view. Updates the centre from ``teacher`` (after computing the loss)."""
        if not teacher or len(student) < 2:
            raise ValueError("DINO needs teacher outputs and at least two student views")
        temp = self.teacher_temperature(epoch)
        targets = [F.softmax((t.float() - self.center) / temp, dim=-1).detach() for t in teacher]
        logs = [F.log_softmax(s.float() / self.student_temp, dim=-1) for s in student]
        total, pairs = 0.0, 0
        for i, target in enumerate(targets):
            for j, log_p in enumerate(logs):
                if i == j:
                    continue
                total = total + (-target * log_p).sum(dim=-1).mean()
                pairs += 1
        self.update_center(torch.cat([t.detach().float() for t in teacher]))
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher: torch.Tensor) -> None:
        """Exponential moving average of the teacher's batch mean (over all processes)."""
        mean = teacher.mean(dim=0, keepdim=True)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean)
            mean /= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(mean, alpha=1 - self.center_momentum)
