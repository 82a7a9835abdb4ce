"""The epoch loop of self-supervised pretraining.

Same machinery as supervised training (``engine.train``): accelerate for devices and DDP,
AdamW with warm-up and cosine decay, atomic checkpoints after every epoch holding the whole
method state (student, teacher, heads, decoder, DINO's centre), optimiser, schedule, sampler
and every RNG, so ``resume`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from clinadapt.engine.batches import EpochSampler
from clinadapt.engine.checkpoint import CheckpointDir, restore_run_state, save_run_state
from clinadapt.engine.curves import plot_curves, write_history
from clinadapt.engine.loop import device_peak_memory_mb, divergence_error
from clinadapt.engine.precision import memory_format_for
from clinadapt.engine.runtime import accelerator_session, deterministic_kernels
from clinadapt.engine.schedule import build_optimizer, lr_factor, parameter_groups
from clinadapt.errors import DataError
from clinadapt.ssl.base import PretrainModel
from clinadapt.ssl.config import PretrainConfig
from clinadapt.ssl.views import ViewGenerator

Monitor = Callable[[], dict[str, float]]
PANELS = (
    ("self-supervised loss", ("loss",)),
    ("online k-NN (validation)", ("knn_auc", "knn_acc", "knn_balanced_accuracy")),
    ("learning rate", ("lr",)),
)


@dataclass
class PretrainResult:
    history: list[dict[str, Any]]
    time_per_epoch_s: float
    total_s: float
    peak_memory_mb: float
    precision: str
    trainable_parameters: int


class UnlabelledImages(Dataset):
    """Images (or volumes) of several sources in one index, each preprocessed on its own so that
    grayscale and colour images, or different sizes, can share a batch."""

    def __init__(self, sources: list[Any], preprocess: Callable[[np.ndarray], torch.Tensor]):
        self.sources, self.preprocess = sources, preprocess
        self.offsets = np.cumsum([0, *(len(s) for s in sources)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int) -> torch.Tensor:
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        item = np.asarray(self.sources[k][i - int(self.offsets[k])])
        return torch.as_tensor(self.preprocess(item[None]))[0].float()


def pretrain(
    model: PretrainModel,
    images: UnlabelledImages,
    views: ViewGenerator,
    config: PretrainConfig,
    *,
    resolved: dict[str, Any],
    out_dir: Path,
    precision: str,
    freeze_norm_statistics: bool,
    monitor: Monitor | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Train ``model`` in place for ``config.epochs``; ``out_dir`` receives ``history.json``,
    ``curves.png`` and ``checkpoint/``. ``monitor()`` (on the main process, every
    ``config.monitor_every`` epochs and at the end) returns k-NN scores for the history."""
    if len(images) < 2:
        raise DataError(f"pretraining needs at least 2 images, got {len(images)}")
    with (
        accelerator_session(precision, config.device) as accelerator,
        deterministic_kernels(config.deterministic),
    ):
        loop = _Loop(
            accelerator,
            model,
            images,
            views,
            config,
            resolved,
            out_dir,
            freeze_norm_statistics,
            monitor,
            progress,
        )
        return loop.run(precision)


class _Loop:
    def __init__(
        self,
        accelerator: Any,
        model: PretrainModel,
        images: UnlabelledImages,
        views: ViewGenerator,
        config: PretrainConfig,
        resolved: dict[str, Any],
        out_dir: Path,
        freeze_norm_statistics: bool,
        monitor: Monitor | None,
        progress: bool,
    ) -> None:
        from accelerate.utils import set_seed

        self.acc, self.model, self.views, self.config = accelerator, model, views, config
        self.resolved = {**resolved, "world_size": accelerator.num_processes}
        self.out_dir, self.monitor = out_dir, monitor
        self.freeze_norm_statistics = freeze_norm_statistics
        self.progress = progress and accelerator.is_main_process
        set_seed(config.seed, device_specific=True)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.sampler = EpochSampler(len(images), config.seed)
        batch = min(config.batch_size, len(images))
        loader = DataLoader(
            images,
            batch_size=batch,
            sampler=self.sampler,
            num_workers=config.num_workers,
            drop_last=True,  # a last batch of one breaks batch norm and has no negatives
        )
        self.loader = accelerator.prepare(loader)
        # the layout feature extraction (the k-NN monitor) uses, from the start, so a resumed
        # run computes with the same kernels as an uninterrupted one
        self.layout = memory_format_for(model.encoder)
        self.net = accelerator.prepare(model.to(memory_format=self.layout))
        optimizer = build_optimizer(
            parameter_groups(model, config.weight_decay), "adamw", config.lr, 0.9
        )
        self.steps_per_epoch = max(1, len(self.loader))
        factor = lr_factor(
            "cosine", self.steps_per_epoch, config.epochs, config.warmup_epochs, (), 1.0
        )
        self.scheduler = LambdaLR(optimizer, factor)
        self.optimizer = accelerator.prepare(optimizer)
        self.checkpoints = CheckpointDir(out_dir / "checkpoint")
        self.epoch = 0
        self.history: list[dict[str, Any]] = []

    def run(self, precision: str) -> PretrainResult:
        start = time.perf_counter()
        finished = self._restore() if self.config.resume else False
        try:
            while not finished:
                began, epoch = time.perf_counter(), self.epoch + 1
                row: dict[str, Any] = {"epoch": epoch, **self._train_epoch(epoch)}
                last = epoch == self.config.epochs
                if (
                    self.monitor is not None
                    and self.acc.is_main_process
                    and (last or epoch % self.config.monitor_every == 0)
                ):
                    row.update(self.monitor())
                row["seconds"] = time.perf_counter() - began
                self.history.append(row)
                self.epoch, finished = epoch, last
                self._save(finished)
        finally:  # undo accelerate's autocast wrapper of forward
            self.acc.unwrap_model(self.net, keep_fp32_wrapper=False)
        self.model.eval()
        if self.acc.is_main_process:
            write_history(self.history, self.out_dir / "history.json")
            plot_curves(self.history, self.out_dir / "curves.png", PANELS)
        self.acc.wait_for_everyone()
        return PretrainResult(
            history=self.history,
            time_per_epoch_s=float(np.mean([r["seconds"] for r in self.history])),
            total_s=time.perf_counter() - start,
            peak_memory_mb=device_peak_memory_mb(self.acc.device),
            precision=precision,
            trainable_parameters=sum(p.numel() for p in self.trainable),
        )

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        acc, config = self.acc, self.config
        self.net.train()
        if self.freeze_norm_statistics:
            for module in self.model.encoder.modules():
                if isinstance(module, nn.modules.batchnorm._NormBase):
                    module.eval()
        lr = self.optimizer.param_groups[0]["lr"]
        total = torch.zeros(2, dtype=torch.float64)
        bar = tqdm(
            self.loader,
            desc=f"pretrain {epoch}/{config.epochs}",
            unit="batch",
            leave=False,
            disable=not self.progress,
        )
        for step, x in enumerate(bar, 1):
            views = [
                v.contiguous(memory_format=self.layout) if v.ndim == 4 else v for v in self.views(x)
            ]
            loss = self.net(views, epoch - 1)
            stats = acc.gather(torch.stack([loss.detach().float(), loss.new_ones(())])[None])
            if not torch.isfinite(stats[:, 0]).all():
                raise divergence_error(
                    "pretraining",
                    epoch,
                    step,
                    stats[:, 0],
                    lr,
                    self.resolved["precision"],
                    self.epoch,
                    self.checkpoints.root,
                )
            acc.backward(loss)
            self.model.before_optimizer_step(epoch - 1)
            if config.clip_grad_norm > 0:
                acc.clip_grad_norm_(self.trainable, config.clip_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            done = (epoch - 1) * self.steps_per_epoch + step
            self.model.after_optimizer_step(done / (config.epochs * self.steps_per_epoch))
            total += stats.double().sum(dim=0).cpu()
            bar.set_postfix(loss=f"{total[0] / total[1]:.4f}")
        bar.close()
        return {"loss": float(total[0] / total[1]), "lr": lr}

    def _state(self) -> dict[str, torch.Tensor]:
        return {
            k: v.detach().to("cpu", copy=True).contiguous()
            for k, v in self.model.state_dict().items()
        }

    def _save(self, finished: bool) -> None:
        save_run_state(
            self.acc,
            self.checkpoints,
            generator=self.views.generator,
            model=self._state,
            best=dict,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            meta={
                "epoch": self.epoch,
                "finished": finished,
                "history": self.history,
                "sampler": self.sampler.state(),
                "config": self.resolved,
            },
            history_file=self.out_dir / "history.json",
        )

    def _restore(self) -> bool:
        """Continue from the checkpoint, if any; True when that run had already finished."""
        ckpt = self.checkpoints.load(self.resolved)
        if ckpt is None:
            return False
        self.model.load_state_dict(ckpt.model)
        restore_run_state(
            self.acc,
            ckpt,
            generator=self.views.generator,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )
        self.sampler.load_state(ckpt.meta["sampler"])
        self.epoch, self.history = ckpt.meta["epoch"], ckpt.meta["history"]
        return bool(ckpt.meta["finished"]) or self.epoch >= self.config.epochs


def resolved_config(config: PretrainConfig, **extra: Any) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (``resume`` and workers aside)."""
    from clinadapt.config import to_dict

    out = {**to_dict(config), **extra}
    for key in ("resume", "num_workers"):
        out.pop(key)
    return out
