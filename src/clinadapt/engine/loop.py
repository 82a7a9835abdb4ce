"""The epoch loop behind ``clinadapt.engine.train.train``.

One ``Loop`` per run: it owns the prepared model, optimiser, schedule, data loaders, sampler
and augmentation generator, and checkpoints all of them after every epoch so that a resumed
run continues exactly as an uninterrupted one would have.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from clinadapt.data.info import TaskType
from clinadapt.engine.augment import AugmentConfig, Augmenter
from clinadapt.engine.batches import (
    ArraySource,
    EpochSampler,
    SliceMean,
    balanced_sample_weights,
    collate_for,
)
from clinadapt.engine.checkpoint import (
    CheckpointDir,
    load_trainable_state,
    restore_run_state,
    save_run_state,
    trainable_state,
)
from clinadapt.engine.curves import plot_curves, write_history
from clinadapt.engine.flops import counting_flops, throughput
from clinadapt.engine.precision import memory_format_for
from clinadapt.engine.schedule import build_optimizer, lr_factor, parameter_groups
from clinadapt.engine.train_config import EpochCallback, TrainConfig, TrainResult
from clinadapt.errors import ClinadaptError, ConfigError
from clinadapt.tasks import Task

if TYPE_CHECKING:
    from accelerate import Accelerator

SYNC_EVERY = 20
"""Training steps between looks at the loss on the host: each look waits for the device to
finish, so looking every step would stall a GPU's queue of kernels."""

log = logging.getLogger(__name__)


def keep_frozen_norms_in_eval(model: nn.Module) -> None:
    """Norm layers with running statistics and no trainable parameter belong to the frozen part
    of the model: in train mode their statistics would drift towards the training batches.

    Models that decide this themselves (``AdaptedModel.frozen_norms``, kept in eval mode by its
    ``train()``; full fine-tuning lets every norm train) are left to do so.
    """
    if hasattr(model, "frozen_norms"):
        return
    for module in model.modules():
        if (
            isinstance(module, nn.modules.batchnorm._NormBase)
            and module.track_running_stats
            and not any(p.requires_grad for p in module.parameters(recurse=False))
        ):
            module.eval()


def freezes_norm_statistics(model: nn.Module, mode: str) -> bool:
    """Whether batch-norm statistics stay fixed while training.

    A pretrained backbone's statistics describe its pretraining data; re-estimating them from
    small medical batches (or, for converted weights whose batch norm was folded into the
    convolutions, from any batch) changes the features the method set out to adapt.
    """
    if mode not in ("auto", "update", "frozen"):
        raise ConfigError(f"norm_statistics must be auto, update or frozen, got {mode!r}")
    if mode == "auto":
        return bool(getattr(getattr(model, "backbone", model), "is_pretrained", False))
    return mode == "frozen"


class Loop:
    """Trains ``model`` in place; see ``train`` for the contract."""

    def __init__(
        self,
        accelerator: Accelerator,
        model: nn.Module,
        train: tuple[Any, np.ndarray],
        val: tuple[Any, np.ndarray] | None,
        *,
        task: Task,
        task_type: TaskType,
        num_classes: int,
        preprocess: Any,
        config: TrainConfig,
        augment: AugmentConfig,
        resolved: dict[str, Any],
        out_dir: Path,
        volume: bool,
        progress: bool,
    ) -> None:
        from accelerate.utils import set_seed

        self.acc, self.model, self.config = accelerator, model, config
        self.task, self.task_type = task, task_type
        self.resolved, self.out_dir = resolved, out_dir
        self.progress = progress and accelerator.is_main_process
        set_seed(config.seed, device_specific=True)
        self.freeze_norm_statistics = freezes_norm_statistics(model, config.norm_statistics)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.draws_prompts = getattr(model, "draws_prompts", False)
        """A promptable model draws its prompts from the targets and returns its own loss
        (``adapt.sam_segmenter``)."""
        if not self.trainable:
            raise ConfigError(
                "the model has no trainable parameters; apply a fine-tuning method first"
            )
        images, labels = train
        weights = None
        if config.class_balance == "sampler":
            weights = balanced_sample_weights(labels, task_type, num_classes)
        self.sampler = EpochSampler(len(labels), config.seed, weights)
        collate = collate_for(task, preprocess, volume, config.max_slices)
        n, b = len(labels), config.batch_size
        loader = DataLoader(
            ArraySource(images, labels),
            batch_size=b,
            sampler=self.sampler,
            collate_fn=collate,
            num_workers=config.num_workers,
            drop_last=n > b and n % b == 1,  # a batch of one breaks BatchNorm in train mode
        )
        self.train_loader = accelerator.prepare(loader)
        self.val_labels = None if val is None else val[1]
        self.val_loader = None
        if val is not None:
            val_loader = DataLoader(
                ArraySource(*val), batch_size=b, collate_fn=collate, num_workers=config.num_workers
            )
            self.val_loader = accelerator.prepare(val_loader)
        self.criterion = task.criterion(
            task_type,
            num_classes,
            labels,
            class_weights=config.class_balance == "weights",
            label_smoothing=config.label_smoothing,
        ).to(accelerator.device)
        self.layout = memory_format_for(model)
        net = (SliceMean(model) if volume else model).to(memory_format=self.layout)
        self.prepared = accelerator.prepare(net)  # what accelerate wrapped, and unwraps after
        self.net = torch.compile(self.prepared) if config.compile else self.prepared
        self.flops_per_example: float | None = None
        """Training FLOPs (forward and backward) per example, counted on the first step."""
        optimizer = build_optimizer(
            parameter_groups(model, config.weight_decay),
            config.optimizer,
            config.lr,
            config.momentum,
        )
        steps = math.ceil(len(self.train_loader) / config.grad_accumulation)
        factor = lr_factor(
            config.schedule,
            steps,
            config.epochs,
            config.warmup_epochs,
            config.milestones,
            config.gamma,
        )
        self.scheduler = LambdaLR(optimizer, factor)
        self.optimizer = accelerator.prepare(optimizer)
        seed = int(
            np.random.SeedSequence([config.seed, accelerator.process_index]).generate_state(1)[0]
        )
        self.augment = Augmenter(augment, seed)
        self.checkpoints = CheckpointDir(out_dir / "checkpoint")
        self.epoch, self.bad_evals, self.stopped_early = 0, 0, False
        self.history: list[dict[str, Any]] = []
        self.best_epoch, self.best_score = 0, math.nan
        self.best_val: dict[str, Any] = {}
        self.best_state: dict[str, torch.Tensor] = {}

    def run(self, *, resume: bool, on_epoch_end: EpochCallback | None) -> TrainResult:
        start = time.perf_counter()
        device = self.acc.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            self._epochs(resume, on_epoch_end)
        finally:  # undo accelerate's autocast wrapper of forward, also when training failed
            self.acc.unwrap_model(self.prepared, keep_fp32_wrapper=False)
        load_trainable_state(self.model, self.best_state)
        self.model.eval()
        if self.acc.is_main_process:
            write_history(self.history, self.out_dir / "history.json")
            plot_curves(self.history, self.out_dir / "curves.png")
        self.acc.wait_for_everyone()
        return TrainResult(
            best_epoch=self.best_epoch,
            best_val=self.best_val,
            history=self.history,
            time_per_epoch_s=float(np.mean([r["seconds"] for r in self.history])),
            throughput=throughput(
                sum(r.get("examples", 0) for r in self.history),
                sum(r.get("train_seconds", 0.0) for r in self.history),
                self.flops_per_example,
            ),
            total_s=time.perf_counter() - start,
            peak_memory_mb=device_peak_memory_mb(device),
            stopped_early=self.stopped_early,
            precision=self.resolved["precision"],
            trainable_parameters=sum(p.numel() for p in self.trainable),
        )

    def _epochs(self, resume: bool, on_epoch_end: EpochCallback | None) -> None:
        finished = self._restore() if resume else False
        while not finished:
            epoch, began = self.epoch + 1, time.perf_counter()
            row: dict[str, Any] = {"epoch": epoch, **self._train_epoch(epoch)}
            last = epoch == self.config.epochs
            if self.val_loader is not None and (last or epoch % self.config.eval_every == 0):
                metrics = self._validate()
                shown = ("loss", *self.task.printed_metrics)
                row.update({f"val_{k}": metrics[k] for k in shown if k in metrics})
                self._select(epoch, metrics)
            row["seconds"] = time.perf_counter() - began
            self.history.append(row)
            self.epoch = epoch
            finished = last or self.stopped_early
            self._save(finished)
            if on_epoch_end is not None:
                on_epoch_end(epoch, row)

    def _train_epoch(self, epoch: int) -> dict[str, float]:
        acc, config = self.acc, self.config
        self.net.train()
        keep_frozen_norms_in_eval(self.model)
        if self.freeze_norm_statistics:
            for module in self.model.modules():
                if isinstance(module, nn.modules.batchnorm._NormBase):
                    module.eval()
        lr = self.optimizer.param_groups[0]["lr"]  # the epoch's first step's learning rate
        total = torch.zeros(2, dtype=torch.float64)
        pending: list[torch.Tensor] = []  # per-step (loss x size, size), still on the device
        began = time.perf_counter()
        bar = tqdm(
            self.train_loader,
            desc=f"epoch {epoch}/{config.epochs}",
            unit="batch",
            leave=False,
            disable=not self.progress,
        )
        for step, (x, y, _) in enumerate(bar, 1):
            with acc.accumulate(self.net), self._counting(len(y)):
                if self.task.dense_targets:
                    x, y = self.augment(x, y)
                else:
                    x = self.augment(x)
                x = self._layout(x)
                if self.draws_prompts:
                    loss = self.net(x, y, generator=self.augment.generator).loss.float()
                else:
                    loss = self.criterion(self.net(x).float(), y)
                size = torch.tensor(float(len(y)), device=loss.device)
                pending.append(acc.gather(torch.stack([loss.detach() * size, size])[None]))
                acc.backward(loss)
                if acc.sync_gradients and config.clip_grad_norm > 0:
                    acc.clip_grad_norm_(self.trainable, config.clip_grad_norm)
                self.optimizer.step()
                if acc.sync_gradients and not self.optimizer.step_was_skipped:
                    self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
            if step % SYNC_EVERY == 0:
                total += self._settle(pending, epoch, step, lr)
                bar.set_postfix(loss=f"{total[0] / total[1]:.4f}")
        total += self._settle(pending, epoch, step, lr)
        bar.close()
        return {
            "train_loss": float(total[0] / total[1]),
            "lr": lr,
            "examples": int(total[1]),
            "train_seconds": time.perf_counter() - began,
        }

    def _settle(
        self, pending: list[torch.Tensor], epoch: int, step: int, lr: float
    ) -> torch.Tensor:
        """The summed (loss x size, size) of the pending steps, which end at ``step``; a
        ``divergence_error`` naming the first step whose loss is not finite."""
        if not pending:
            return torch.zeros(2, dtype=torch.float64)
        stats = torch.stack(pending).double().cpu()  # (steps, processes, 2)
        first = step - len(pending) + 1
        pending.clear()
        finite = torch.isfinite(stats[:, :, 0]).all(dim=1)
        if not finite.all():
            bad = int((~finite).nonzero()[0])
            raise divergence_error(
                "training",
                epoch,
                first + bad,
                stats[bad, :, 0],
                lr,
                self.resolved["precision"],
                self.epoch,
                self.checkpoints.root,
            )
        return stats.sum(dim=(0, 1))

    @contextlib.contextmanager
    def _counting(self, batch: int) -> Iterator[None]:
        """Counts the FLOPs of the first step (``flops_per_example``); a no-op after, and for
        compiled models, whose fused kernels the counter does not see."""
        if self.flops_per_example is not None or self.config.compile:
            yield
            return
        with counting_flops() as count:
            yield
        self.flops_per_example = count.total / batch

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.layout) if x.ndim == 4 else x

    @torch.no_grad()
    def _validate(self) -> dict[str, Any]:
        self.net.eval()
        parts, index = [], []
        for x, y, idx in self.val_loader:
            x = self._layout(x)
            logits = self.net(x, y).logits if self.draws_prompts else self.net(x)
            part = self.task.validation_part(logits, y, self.task_type)
            part, idx = self.acc.gather_for_metrics((part, idx))
            parts.append(part.cpu())
            index.append(idx.cpu())
        order = torch.cat(index).argsort()
        rows = torch.cat(parts)[order].double().numpy()
        return self.task.validation_metrics(rows, self.val_labels, self.task_type)

    def _select(self, epoch: int, metrics: dict[str, Any]) -> None:
        """Keep the best epoch's state; count evaluations without improvement."""
        key = self.config.select_metric
        score = -metrics[key] if key == "loss" else metrics[key]
        first = self.best_epoch == 0
        if first or (math.isfinite(score) and not score <= self.best_score):
            self.best_epoch, self.best_score, self.best_val = epoch, score, metrics
            self.best_state = trainable_state(self.model)
            self.bad_evals = 0
            return
        self.bad_evals += 1
        patience = self.config.early_stopping_patience
        self.stopped_early = patience > 0 and self.bad_evals >= patience

    def _save(self, finished: bool) -> None:
        state = trainable_state(self.model)
        if self.val_loader is None:  # without validation the last epoch is the result
            self.best_epoch, self.best_state = self.epoch, state
        save_run_state(
            self.acc,
            self.checkpoints,
            generator=self.augment.generator,
            model=lambda: state,
            best=lambda: self.best_state,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            meta={
                "epoch": self.epoch,
                "finished": finished,
                "history": self.history,
                "best_epoch": self.best_epoch,
                "best_score": self.best_score,
                "best_val": self.best_val,
                "bad_evals": self.bad_evals,
                "stopped_early": self.stopped_early,
                "sampler": self.sampler.state(),
                "config": self.resolved,
                "torch_threads": torch.get_num_threads(),
            },
            history_file=self.out_dir / "history.json",
        )

    def _restore(self) -> bool:
        """Continue from the checkpoint, if any; True when that run had already finished."""
        ckpt = self.checkpoints.load(self.resolved)
        if ckpt is None:
            return False
        load_trainable_state(self.model, ckpt.model)
        restore_run_state(
            self.acc,
            ckpt,
            generator=self.augment.generator,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
        )
        meta = ckpt.meta
        self.sampler.load_state(meta["sampler"])
        self.epoch, self.history = meta["epoch"], meta["history"]
        self.best_epoch, self.best_score = meta["best_epoch"], meta["best_score"]
        self.best_val, self.best_state = meta["best_val"], ckpt.best
        self.bad_evals, self.stopped_early = meta["bad_evals"], meta["stopped_early"]
        threads, saved = torch.get_num_threads(), meta.get("torch_threads")
        if self.acc.device.type == "cpu" and saved not in (None, threads) and not meta["finished"]:
            log.warning(
                "resuming %s with %d torch threads where it trained with %d: on a CPU the "
                "reduction order, and so the rest of the run, depends on the thread count; set "
                "OMP_NUM_THREADS=%d to continue it exactly as an uninterrupted run",
                self.out_dir,
                threads,
                saved,
                saved,
            )
        return meta["finished"]


def divergence_error(
    what: str,
    epoch: int,
    step: int,
    losses: torch.Tensor,
    lr: float,
    precision: str,
    last_epoch: int,
    checkpoint_dir: Path,
) -> ClinadaptError:
    """What to tell the user when the loss stopped being finite, and what was kept."""
    kept = (
        f"the last good checkpoint (epoch {last_epoch}) is in {checkpoint_dir}"
        if last_epoch
        else "no checkpoint had been written yet"
    )
    return ClinadaptError(
        f"{what} diverged: the loss is {losses.tolist()} at epoch {epoch}, step {step}. "
        f"Lower the learning rate (lr={lr:g} now) or train in full precision "
        f"(precision='fp32'; this run used {precision}); {kept}"
    )


def device_peak_memory_mb(device: torch.device) -> float:
    """CUDA's peak allocation on a GPU, else the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024
