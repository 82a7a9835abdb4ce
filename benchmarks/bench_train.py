"""Cost of a training step in the engine: full fine-tuning against LoRA, and bf16 against fp32.

A ViT-S/16 (timm ``vit_small_patch16_224``, random weights) with a binary head is trained by
``clinadapt.engine.train.train`` on synthetic 224 px grayscale images, batch 16, no
augmentation. Each variant runs in a fresh subprocess so that ``ru_maxrss`` (the peak resident
set) is its own. A step's time is the interval between consecutive forward calls during
training (forward, backward, clipping, optimiser step, and loading the next batch); the first
``--warmup`` steps are excluded. Peak memory is read at the last step's forward, so it covers
every earlier step and not the checkpoint written after the epoch.

Memory is measured in a second, short run of each variant with glibc's
``MALLOC_MMAP_THRESHOLD_`` fixed (``--mmap-threshold``, default 64 KiB), so that freed
activations go back to the system. With glibc's default dynamic threshold they stay in a
fragmented heap and the peak depends on allocation order (PEFT's many small LoRA tensors made
LoRA look 35% larger than full fine-tuning); that peak is kept as ``peak_rss_mb_default_malloc``.
Timing runs use the default allocator, as a user would (a fixed threshold makes every large
allocation a fresh, zeroed mapping, which slows small-tensor-heavy methods such as LoRA).

Reports (a) LoRA / full ratios of trainable parameters, peak memory and step time (fp32), each
with the training defaults (gradient checkpointing on for LoRA, off for full fine-tuning),
(b) what checkpointing costs and saves LoRA (``lora-fp32`` against ``lora-fp32-stored``, which
keeps every activation) and (c) the fp32 / bf16 step-time ratio of full fine-tuning (bf16
autocast via accelerate).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import peak_mb

BACKBONE = "timm:vit_small_patch16_224"
VARIANTS = {  # method, precision, gradient checkpointing
    "full-fp32": ("full", "fp32", "auto"),
    "lora-fp32": ("lora", "fp32", "auto"),
    "lora-fp32-stored": ("lora", "fp32", False),
    "full-bf16": ("full", "bf16", "auto"),
}


def worker(variant: str, batch: int, steps: int, warmup: int, threads: int) -> dict:
    import torch

    if threads:
        torch.set_num_threads(threads)
    from torch import nn

    from clinadapt.adapt import AdaptedModel, create_method
    from clinadapt.backbones import create_backbone
    from clinadapt.data import Preprocess
    from clinadapt.engine.train import train
    from clinadapt.engine.train_config import TrainConfig

    class StepTimer(nn.Module):
        """Records when each training forward starts, and the peak memory until then."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model, self.starts, self.peaks = model, [], []

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.starts.append(time.perf_counter())
            self.peaks.append(peak_mb())
            return self.model(x)

    method, precision, checkpointing = VARIANTS[variant]
    torch.manual_seed(0)
    backbone = create_backbone(BACKBONE, "none")
    model = create_method(method).apply(AdaptedModel(backbone, 2))
    timer = StepTimer(model)
    n = batch * (warmup + steps + 1)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, 224, 224), dtype=np.uint8)
    labels = (np.arange(n) % 2)[:, None].astype(np.int64)
    cfg = backbone.pretrained_cfg
    preprocess = Preprocess(224, cfg.mean, cfg.std, "nearest")
    config = TrainConfig(
        epochs=1,
        batch_size=batch,
        lr=1e-4,
        precision=precision,
        device="cpu",
        augment="none",
        gradient_checkpointing=checkpointing,
    )
    baseline = peak_mb()
    with tempfile.TemporaryDirectory() as out:
        result = train(
            timer,
            (images, labels),
            None,
            task="binary",
            num_classes=2,
            preprocess=preprocess,
            config=config,
            out_dir=Path(out),
            progress=False,
        )
    intervals = np.diff(timer.starts)[warmup:]
    return {
        "variant": variant,
        "method": method,
        "precision": result.precision,
        "gradient_checkpointing": result.gradient_checkpointing,
        "trainable_parameters": result.trainable_parameters,
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "measured_steps": len(intervals),
        "step_s_mean": round(float(intervals.mean()), 3),
        "step_s_median": round(float(np.median(intervals)), 3),
        "step_s_min": round(float(intervals.min()), 3),
        "rss_before_training_mb": round(baseline, 1),
        "peak_rss_mb": round(timer.peaks[-1], 1),
        "torch_threads": torch.get_num_threads(),
    }


def run_worker(
    variant: str, args: argparse.Namespace, *, steps: int, warmup: int, env: dict[str, str]
) -> dict:
    """One variant in a fresh process (its own ru_maxrss), with ``env`` added."""
    command = [sys.executable, __file__, f"--worker={variant}", f"--batch-size={args.batch_size}"]
    command += [f"--steps={steps}", f"--warmup={warmup}", f"--threads={args.threads}"]
    proc = subprocess.run(
        command, capture_output=True, text=True, check=False, env={**os.environ, **env}
    )
    if proc.returncode:
        sys.exit(f"worker {variant} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10, help="measured steps")
    parser.add_argument("--warmup", type=int, default=3, help="steps excluded from timing")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default); 1 gives stable numbers on a shared machine",
    )
    parser.add_argument(
        "--mmap-threshold",
        type=int,
        default=65536,
        help="glibc MALLOC_MMAP_THRESHOLD_ for the workers in bytes (0: glibc's default)",
    )
    parser.add_argument("--name", default="train", help="results/<name>.json")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = {
        "batch": args.batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "threads": args.threads,
    }
    if args.worker is not None:
        print(json.dumps(worker(args.worker, **sizes)))
        return

    from _common import command, write_result

    runs = {}
    for variant in args.variants.split(","):
        run = run_worker(variant, args, steps=args.steps, warmup=args.warmup, env={})
        run["peak_rss_mb_default_malloc"] = run["peak_rss_mb"]
        if args.mmap_threshold:
            env = {"MALLOC_MMAP_THRESHOLD_": str(args.mmap_threshold)}
            memory = run_worker(variant, args, steps=2, warmup=1, env=env)
            run["rss_before_training_mb"] = memory["rss_before_training_mb"]
            run["peak_rss_mb"] = memory["peak_rss_mb"]
        runs[variant] = run
        print(json.dumps(runs[variant]), flush=True)
    result: dict = {
        "backbone": BACKBONE,
        "weights": "none",
        "input_size": 224,
        "batch_size": args.batch_size,
        "measured_steps": args.steps,
        "warmup_steps": args.warmup,
        "command": command(),
        "torch_threads": args.threads or "default",
        "malloc_mmap_threshold": args.mmap_threshold or "glibc default",
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "runs": runs,
    }
    full, lora, stored, bf16 = (runs.get(v) for v in VARIANTS)
    if full and lora:

        def above_baseline(run: dict) -> float:
            return run["peak_rss_mb"] - run["rss_before_training_mb"]

        result["lora_vs_full"] = {
            "trainable_parameter_ratio": round(
                lora["trainable_parameters"] / full["trainable_parameters"], 5
            ),
            "peak_memory_ratio": round(lora["peak_rss_mb"] / full["peak_rss_mb"], 3),
            "training_memory_ratio": round(above_baseline(lora) / above_baseline(full), 3),
            "step_time_ratio": round(lora["step_s_median"] / full["step_s_median"], 3),
            "step_time_ratio_fastest_steps": round(lora["step_s_min"] / full["step_s_min"], 3),
        }
    if lora and stored:
        result["lora_checkpointing_vs_stored"] = {
            "peak_memory_ratio": round(lora["peak_rss_mb"] / stored["peak_rss_mb"], 3),
            "step_time_ratio": round(lora["step_s_median"] / stored["step_s_median"], 3),
            "step_time_ratio_fastest_steps": round(lora["step_s_min"] / stored["step_s_min"], 3),
        }
    if full and bf16:
        result["fp32_over_bf16"] = {
            "step_time_ratio": round(full["step_s_median"] / bf16["step_s_median"], 3),
            "step_time_ratio_fastest_steps": round(full["step_s_min"] / bf16["step_s_min"], 3),
            "peak_memory_ratio": round(full["peak_rss_mb"] / bf16["peak_rss_mb"], 3),
        }
    write_result(args.name, result)


if __name__ == "__main__":
    main()
