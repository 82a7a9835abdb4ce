"""The MedMNIST v2 pneumoniamnist epoch, side by side: this code against an earlier revision.

Each run is ``clinadapt reproduce medmnist-v2 --datasets pneumoniamnist --epochs E`` (ResNet-18
at 28 px from scratch, batch 128, Adam) in a fresh subprocess, alternating the revisions
``--repeats`` times so that both see the same machine load. The old revision's ``src`` is
exported with ``git archive``. Reported per run: the last epoch's wall time (the first pays for
warm-up, and for compilation with ``train.compile``), the whole process's CPU time, validation
AUC after each epoch (a fixed seed must give the same curve within noise), and images/s and
TFLOP/s of the training steps, with FLOPs counted once per image for a forward and backward
pass (``torch.utils.flop_counter``). ``--compile`` adds a run of this code with
``train.compile=true``.

It also profiles one training step of this code's setup (bf16 autocast where the run chose it,
channels-last) and reports where the step goes, op by op, with the convolutions' achieved
TFLOP/s forward and backward: the answer to whether the data pipeline or the kernels bound it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command, default_data_root, machine, write_result

REPO = Path(__file__).resolve().parents[1]
DATASET = "pneumoniamnist"


def export_revision(rev: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", rev, "src"], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into / "src"


def run_once(src: Path, out: Path, epochs: int, data_root: str, compile_: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(src), "CLINADAPT_DATA": data_root}
    args = [sys.executable, "-m", "clinadapt", "reproduce", "medmnist-v2"]
    args += ["--datasets", DATASET, "--epochs", str(epochs), "--out", str(out), "--quiet"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    if compile_:  # reproduce takes no overrides: run its grid with the option set
        code = (
            "import dataclasses, sys; from clinadapt.runner.bench import run_grid; "
            "from clinadapt.runner.presets import medmnist_v2; "
            f"(p,) = medmnist_v2(None, [{DATASET!r}], {epochs}); "
            "train = {**p.grid.base['train'], 'compile': True}; "
            "grid = dataclasses.replace(p.grid, base={**p.grid.base, 'train': train}); "
            f"run_grid(grid, {str(out)!r}, progress=False)"
        )
        args = [sys.executable, "-c", code]
    subprocess.run(args, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    (record_path,) = [p for p in out.rglob("*.json") if p.parent.name == "full"]
    record = json.loads(record_path.read_text())
    if "error" in record:
        raise SystemExit(f"{src} failed: {record['error']}")
    last = record["history"][-1]
    return {
        "epoch_s": last["seconds"],
        "train_steps_s": last.get("train_seconds"),
        "epoch_s_all": [round(r["seconds"], 2) for r in record["history"]],
        "val_auc": [r["val_auc"] for r in record["history"]],
        "process_wall_s": wall,
        "process_cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime),
        "precision": record["preprocessing"]["precision"],
        "train_size": record["dataset"]["split_sizes"]["train"],
        "torch_threads": record["hardware"]["torch_threads"],
    }


def training_flops_per_image() -> float:
    """FLOPs of one forward and backward pass of resnet18_28 on one 28 px image."""
    import torch

    from clinadapt.backbones import create_backbone
    from clinadapt.engine.flops import counting_flops

    model = create_backbone("resnet18_28", "none").model.requires_grad_(True).train()
    model.reset_classifier(2)
    with counting_flops() as count:
        model(torch.randn(1, 3, 28, 28)).sum().backward()
    return float(count.total)


def profile_step(precision: str, batch: int = 128, steps: int = 3) -> dict[str, Any]:
    """Where one training step of the recipe goes, op by op (self CPU time)."""
    import contextlib

    import torch
    from torch.profiler import ProfilerActivity, profile

    from clinadapt.backbones import create_backbone
    from clinadapt.engine.flops import counting_flops

    model = create_backbone("resnet18_28", "none").model.requires_grad_(True).train()
    model.reset_classifier(2)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.randn(batch, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,))

    def step() -> None:
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        )
        with autocast:
            out = model(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with counting_flops() as forward, torch.no_grad():
        model(x)
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ops)
    by_name = {e.key: e.self_cpu_time_total for e in ops}
    conv_fwd = by_name.get("aten::mkldnn_convolution", 0) + by_name.get("aten::_convolution", 0)
    conv_bwd = by_name.get("aten::convolution_backward", 0)
    # flop_counter counts a convolution's backward as twice its forward (the first layer's
    # input gradient, which is not computed, aside)
    conv_flops = forward.total * steps
    return {
        "precision": precision,
        "batch_size": batch,
        "step_s": total / steps / 1e6,
        "top_ops": [
            {"op": e.key, "share": round(e.self_cpu_time_total / total, 4)} for e in ops[:10]
        ],
        "conv_forward_tflop_per_s": conv_flops / (conv_fwd / 1e6) / 1e12 if conv_fwd else None,
        "conv_backward_tflop_per_s": 2 * conv_flops / (conv_bwd / 1e6) / 1e12 if conv_bwd else None,
    }


def data_pipeline_s(data_root: str) -> float:
    """One epoch of the training data alone (read, stack, preprocess; no model), as the
    training loop batches it: how much of an epoch the data could possibly account for."""
    from torch.utils.data import DataLoader

    from clinadapt.backbones import create_backbone
    from clinadapt.data import load_dataset
    from clinadapt.engine.batches import ArraySource, Collate, EpochSampler
    from clinadapt.runner.common import make_preprocess
    from clinadapt.runner.experiment import ExperimentConfig

    cfg = ExperimentConfig(
        dataset=DATASET,
        data_root=data_root,
        backbone="resnet18_28",
        weights="none",
        method="full",
        resize="nearest",
    )
    split = load_dataset(DATASET, root=data_root, size=28)["train"]
    preprocess = make_preprocess(create_backbone("resnet18_28", "none"), cfg)
    loader = DataLoader(
        ArraySource(split.images, split.labels),
        batch_size=128,
        sampler=EpochSampler(len(split), 0),
        collate_fn=Collate(preprocess, False, 0),
    )
    began = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", required=True, help="git revision to compare against")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="add a train.compile=true run")
    parser.add_argument("--name", default="epoch")
    args = parser.parse_args()
    data_root = default_data_root()
    if data_root is None:
        raise SystemExit("no MedMNIST folder: set CLINADAPT_DATA")
    import torch

    at_start = machine()
    flops = training_flops_per_image()
    runs: dict[str, list[dict[str, Any]]] = {"old": [], "new": []}
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"old": export_revision(args.old, Path(tmp) / "old"), "new": REPO / "src"}
        for i in range(args.repeats):
            for name in ("old", "new") if i % 2 == 0 else ("new", "old"):
                out = Path(tmp) / f"{name}-{i}"
                runs[name].append(run_once(sources[name], out, args.epochs, data_root, False))
                print(name, json.dumps(runs[name][-1]), flush=True)
        if args.compile:
            out = Path(tmp) / "compiled"
            runs["new_compiled"] = [run_once(sources["new"], out, args.epochs, data_root, True)]
    for rows in runs.values():
        for row in rows:
            steps_s = row["train_steps_s"] or row["epoch_s"]
            row["images_per_s"] = row["train_size"] / steps_s
            row["train_tflop_per_s"] = row["images_per_s"] * flops / 1e12

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    result = {
        "command": command(),
        "old_revision": subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", args.old], capture_output=True, text=True
        ).stdout.strip(),
        "dataset": DATASET,
        "recipe": "MedMNIST v2 ResNet-18 (28), batch 128, Adam 1e-3, no augmentation",
        "epochs_per_run": args.epochs,
        "training_flops_per_image": flops,
        "machine_at_start": at_start,
        "load_average_at_end": list(os.getloadavg()),
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        "old_over_new": {
            "epoch_s": median("old", "epoch_s") / median("new", "epoch_s"),
            "process_cpu_s": median("old", "process_cpu_s") / median("new", "process_cpu_s"),
        },
        "profile_of_one_step": profile_step(runs["new"][0]["precision"]),
        "data_pipeline_s_per_epoch": data_pipeline_s(data_root),
    }
    if "new_compiled" in runs:
        result["uncompiled_over_compiled_epoch_s"] = (
            median("new", "epoch_s") / runs["new_compiled"][0]["epoch_s"]
        )
    write_result(args.name, result)


if __name__ == "__main__":
    main()
