"""Training checkpoints: everything needed to continue a run exactly where it stopped.

``out_dir/checkpoint/`` holds

- ``model.safetensors``: the trainable state after the last completed epoch,
- ``best.safetensors``: the trainable state of the best epoch so far,
- ``training.pt``: optimiser, scheduler and gradient-scaler state,
- ``rng-<rank>.pt``: python / numpy / torch (CPU and CUDA) RNG states and the augmentation
  generator of each process,
- ``state.json``: epoch, history, best epoch and metrics, early-stopping count, the sampler's
  generator state, and the resolved configuration with its hash.

A checkpoint is written into ``checkpoint.tmp`` and swapped in with two renames, so a crash at
any moment leaves either the previous or the new checkpoint complete (``checkpoint.old`` is
read when the crash fell between the renames). The ``.pt`` files are our own and are read
with ``torch.load(weights_only=True)``, which refuses anything but tensors and plain values.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clinadapt.errors import ClinadaptError, ConfigError
from clinadapt.paths import share_like_new_file

STATE_FILE = "state.json"
META_KEYS = ("config_hash", "config", "epoch", "history", "finished", "sampler")
TRAINING_KEYS = ("optimizer", "scheduler", "scaler")
RNG_KEYS = ("python", "numpy_key", "numpy_pos", "numpy_gauss", "torch", "augment")


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """``safetensors``' ``save_file``, but the file gets the mode the umask gives any new file
    (``save_file`` makes it private to its owner, 0600, unlike every other file of a run)."""
    save_file(tensors, path, metadata=metadata)
    share_like_new_file(path)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and every persistent buffer (norm running statistics and the like,
    small next to the weights): all that training can change, as contiguous CPU copies."""
    params = dict(model.named_parameters())
    return {
        name: tensor.detach().to("cpu", copy=True).contiguous()
        for name, tensor in model.state_dict(keep_vars=True).items()
        if name not in params or params[name].requires_grad
    }


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``trainable_state``) into ``model``; every key must exist."""
    unknown = sorted(set(state) - set(model.state_dict()))
    if unknown:
        raise ClinadaptError(
            f"checkpoint holds tensors the model does not have ({', '.join(unknown[:5])}); it "
            "was written for a different model or method"
        )
    model.load_state_dict(state, strict=False)


def config_hash(resolved: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(resolved, sort_keys=True, default=str).encode()).hexdigest()


def capture_rng(augment: torch.Generator) -> dict[str, Any]:
    """This process's RNG states, in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state(legacy=False)
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy_key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
        "numpy_pos": np_state["state"]["pos"],
        "numpy_gauss": [np_state["has_gauss"], np_state["gauss"]],
        "torch": torch.get_rng_state(),
        "augment": augment.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any], augment: torch.Generator) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {
                "key": state["numpy_key"].numpy().astype(np.uint32),
                "pos": state["numpy_pos"],
            },
            "has_gauss": has_gauss,
            "gauss": cached,
        }
    )
    torch.set_rng_state(state["torch"])
    augment.set_state(state["augment"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class Checkpoint:
    """A checkpoint read back from disk."""

    directory: Path
    meta: dict[str, Any]
    model: dict[str, torch.Tensor]
    best: dict[str, torch.Tensor]
    training: dict[str, Any]

    def rng(self, rank: int) -> dict[str, Any]:
        return _read(self.directory / f"rng-{rank}.pt", _load_pt, RNG_KEYS)


class CheckpointDir:
    """Writes and reads ``root`` atomically (see the module docstring). Under DDP every rank
    calls ``stage`` then ``write_rng``; only the main process calls ``commit``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root.with_name(root.name + ".tmp")
        self.old = root.with_name(root.name + ".old")

    def stage(self) -> None:
        """Start a new checkpoint (main process only, before any rank writes into it)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)

    def write_rng(self, rank: int, state: dict[str, Any]) -> None:
        try:
            torch.save(state, self.staging / f"rng-{rank}.pt")
        except OSError as err:
            raise self._not_written(err) from None

    def commit(
        self,
        *,
        model: dict[str, torch.Tensor],
        best: dict[str, torch.Tensor],
        training: dict[str, Any],
        meta: dict[str, Any],
    ) -> None:
        try:
            save_safetensors(model, self.staging / "model.safetensors")
            save_safetensors(best, self.staging / "best.safetensors")
            torch.save(training, self.staging / "training.pt")
            for path in self.staging.iterdir():
                _fsync(path)
            (self.staging / STATE_FILE).write_text(json.dumps(meta))
            _fsync(self.staging / STATE_FILE)
        except OSError as err:  # a full disk, say: the staged files are useless, the last stays
            shutil.rmtree(self.staging, ignore_errors=True)
            raise self._not_written(err) from None
        shutil.rmtree(self.old, ignore_errors=True)
        if self.root.exists():
            os.replace(self.root, self.old)
        os.replace(self.staging, self.root)
        shutil.rmtree(self.old, ignore_errors=True)

    def _latest(self) -> Path | None:
        """``root``, or ``old`` when a crash fell between the renames; None without either."""
        return next((d for d in (self.root, self.old) if (d / STATE_FILE).is_file()), None)

    def epoch(self) -> int | None:
        """The last completed epoch of the checkpoint, without loading it; None when there is
        none."""
        directory = self._latest()
        if directory is None:
            return None
        return json.loads((directory / STATE_FILE).read_text())["epoch"]

    def load(self, resolved: dict[str, Any]) -> Checkpoint | None:
        """The last complete checkpoint, or None when there is none.

        Raises ``ConfigError`` naming the differing keys when it was written with another
        configuration than ``resolved``.
        """
        directory = self._latest()
        if directory is None:
            return None
        meta = _read(directory / STATE_FILE, lambda p: json.loads(p.read_text()), META_KEYS)
        if meta["config_hash"] != config_hash(resolved):
            old, new = meta["config"], json.loads(json.dumps(resolved, default=str))
            keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys)
            raise ConfigError(
                f"cannot resume from {directory}: it was written with a different configuration "
                f"({changes or 'unknown keys'}); resume with the original settings, or start "
                "over in a new output folder (or without resume)"
            )
        return Checkpoint(
            directory=directory,
            meta=meta,
            model=_read(directory / "model.safetensors", load_file),
            best=_read(directory / "best.safetensors", load_file),
            training=_read(directory / "training.pt", _load_pt, TRAINING_KEYS),
        )

    def _not_written(self, err: OSError) -> ClinadaptError:
        return ClinadaptError(
            f"could not write a checkpoint into {self.staging} ({err}); the previous checkpoint "
            f"in {self.root} is kept: free disk space, then continue with --resume"
        )


def save_run_state(
    accelerator: Any,
    checkpoints: CheckpointDir,
    *,
    generator: torch.Generator,
    model: Callable[[], dict[str, torch.Tensor]],
    best: Callable[[], dict[str, torch.Tensor]],
    optimizer: Any,
    scheduler: Any,
    meta: dict[str, Any],
    history_file: Path,
) -> None:
    """One epoch's checkpoint under accelerate: every rank's RNG, then (main process) the model
    and optimiser state and ``meta["history"]`` as ``history_file``. ``model`` and ``best`` are
    called on the main process only."""
    from clinadapt.engine.curves import write_history

    if accelerator.is_main_process:
        checkpoints.stage()
    accelerator.wait_for_everyone()
    checkpoints.write_rng(accelerator.process_index, capture_rng(generator))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        checkpoints.commit(
            model=model(),
            best=best(),
            training={
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler,
            },
            meta={**meta, "config_hash": config_hash(meta["config"])},
        )
        write_history(meta["history"], history_file)
    accelerator.wait_for_everyone()


def restore_run_state(
    accelerator: Any,
    checkpoint: Checkpoint,
    *,
    generator: torch.Generator,
    optimizer: Any,
    scheduler: Any,
) -> None:
    """The optimiser, schedule, gradient scaler and this rank's RNG states of ``checkpoint``."""
    optimizer.load_state_dict(checkpoint.training["optimizer"])
    scheduler.load_state_dict(checkpoint.training["scheduler"])
    if accelerator.scaler is not None and checkpoint.training["scaler"] is not None:
        accelerator.scaler.load_state_dict(checkpoint.training["scaler"])
    restore_rng(checkpoint.rng(accelerator.process_index), generator)


def _read(path: Path, reader: Callable[[Path], Any], keys: tuple[str, ...] = ()) -> Any:
    """``reader(path)``, or an error that names the damaged file and the way out."""
    try:
        value = reader(path)
    except Exception as err:  # JSON, safetensors and torch's zip format each fail their own way
        problem = f"cannot be read ({type(err).__name__}: {err})"
    else:
        missing = [k for k in keys if not isinstance(value, dict) or k not in value]
        if not missing:
            return value
        problem = f"lacks {', '.join(missing)}"
    raise ClinadaptError(
        f"cannot resume: {path} {problem}. The checkpoint is damaged: delete {path.parent} to "
        "start this run over, or train into a new --out folder"
    )


def _load_pt(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
