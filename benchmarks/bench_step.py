"""One training step of the MedMNIST v2 ResNet-18 (28) in each precision and memory layout.

The pneumoniamnist recipe (batch 128, Adam 1e-3, cross-entropy) stepped in fp32 and under bf16
autocast, with NCHW and channels-last tensors. Every set-up starts from the same seeded weights
and steps on the same real batches (synthetic ones when no data is found); the set-ups alternate
``--rounds`` times so that all see the same machine load, and each step is timed by the
process's CPU time (wall time on this shared machine swings by half from minute to minute).
Reported per set-up: median CPU seconds per step, images/s, TFLOP/s (``engine.flops``, forward
and backward once per image), the speed-up over fp32 NCHW, and how far its first gradient is
from fp32's (cosine over all parameters): what bf16 buys and what it costs numerically, next to
the channels-last gain. ``bench_epoch.py`` times whole epochs of the code as the run uses it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, default_data_root, machine, write_result

BATCH = 128
SETUPS = {  # name: (bf16 autocast, channels-last)
    "fp32_nchw": (False, False),
    "fp32_channels_last": (False, True),
    "bf16_nchw": (True, False),
    "bf16_channels_last": (True, True),
}


Batches = tuple[list[torch.Tensor], list[torch.Tensor], str]


def batches(data_root: str | None, count: int) -> Batches:
    """``count`` training batches of pneumoniamnist normalised as the recipe does (mean and std
    0.5, grey repeated to three channels), or seeded noise when the data is absent."""
    rng = np.random.default_rng(0)
    if data_root and (Path(data_root) / "pneumoniamnist.npz").is_file():
        with np.load(Path(data_root) / "pneumoniamnist.npz") as f:
            images, labels = f["train_images"], f["train_labels"][:, 0]
        source = "pneumoniamnist train split"
    else:
        images = rng.integers(0, 256, (BATCH * count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 2, BATCH * count)
        source = "synthetic noise (no pneumoniamnist.npz found)"
    order = rng.permutation(len(images))[: BATCH * count]
    x = torch.from_numpy(images[order]).float().div(255).sub(0.5).div(0.5)
    x = x[:, None].expand(-1, 3, -1, -1).contiguous()
    y = torch.from_numpy(labels[order].astype(np.int64))
    return list(x.split(BATCH)), list(y.split(BATCH)), source


class Setup:
    def __init__(self, bf16: bool, channels_last: bool) -> None:
        from clinadapt.backbones.medmnist_nets import create_model

        torch.manual_seed(0)
        self.bf16 = bf16
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.model = create_model("resnet18_28", num_classes=2).to(memory_format=self.layout)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def gradient(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x.contiguous(memory_format=self.layout))
        F.cross_entropy(logits.float(), y).backward()
        return torch.cat([p.grad.flatten() for p in self.model.parameters()]).double()

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        began = time.process_time()
        self.gradient(x, y)
        self.optimizer.step()
        return time.process_time() - began


def step_flops(x: torch.Tensor, y: torch.Tensor) -> float:
    from clinadapt.engine.flops import counting_flops

    with counting_flops() as count:
        Setup(False, False).gradient(x, y)
    return float(count.total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed steps per set-up")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--name", default="step", help="results/<name>.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    xs, ys, source = batches(default_data_root(), args.rounds + 1)
    flops = step_flops(xs[0], ys[0])
    setups = {name: Setup(*flags) for name, flags in SETUPS.items()}
    reference = setups["fp32_nchw"].gradient(xs[0], ys[0])
    cosine = {
        name: float(F.cosine_similarity(s.gradient(xs[0], ys[0]), reference, dim=0))
        for name, s in setups.items()
    }
    seconds: dict[str, list[float]] = {name: [] for name in setups}
    for s in setups.values():  # warm-up: oneDNN picks and caches its kernels
        s.step(xs[0], ys[0])
    for x, y in zip(xs[1:], ys[1:], strict=True):
        for name, s in setups.items():
            seconds[name].append(s.step(x, y))

    base = statistics.median(seconds["fp32_nchw"])
    results: dict[str, Any] = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        results[name] = {
            "cpu_s_per_step": round(median, 4),
            "cpu_s_all": [round(t, 4) for t in times],
            "images_per_cpu_s": round(BATCH / median, 1),
            "tflop_per_cpu_s": round(flops / median / 1e12, 4),
            "speedup_over_fp32_nchw": round(base / median, 3),
            "first_gradient_cosine_to_fp32": round(cosine[name], 6),
        }
        print(f"{name:20s} {median:.3f} s/step  {base / median:.2f}x  cos {cosine[name]:.5f}")
    write_result(
        args.name,
        {
            "command": command(),
            "machine": machine(),
            "recipe": "MedMNIST v2 ResNet-18 (28), batch 128, Adam 1e-3, cross-entropy",
            "batches": source,
            "threads": args.threads,
            "training_flops_per_step": flops,
            "setups": results,
        },
    )


if __name__ == "__main__":
    main()
