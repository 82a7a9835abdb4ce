"""Checkpoints: exact resume, refusing another configuration, divergence, crash safety."""

from __future__ import annotations

import errno
import json
import os
import random
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from clinadapt.engine import checkpoint
from clinadapt.engine.checkpoint import CheckpointDir
from clinadapt.engine.train import train
from clinadapt.engine.train_config import TrainConfig
from clinadapt.errors import ClinadaptError, ConfigError

from .ddp_script import PREPROCESS, tiny_data, tiny_model

DATA = tiny_data(n_train=24, n_val=12)
# sampling, augmentation and dropout all draw random numbers that a resume must replay
OPTIONS = {
    "batch_size": 8,
    "lr": 0.05,
    "precision": "fp32",
    "device": "cpu",
    "augment": "medium",
    "class_balance": "sampler",
}


def fit(model, out_dir, *, epochs=4, resume=False, on_epoch_end=None, **options):
    return train(
        model,
        (DATA["train"].images, DATA["train"].labels),
        (DATA["val"].images, DATA["val"].labels),
        task="binary",
        num_classes=2,
        preprocess=PREPROCESS,
        config=TrainConfig(**{**OPTIONS, "epochs": epochs, **options}),
        out_dir=out_dir,
        resume=resume,
        progress=False,
        on_epoch_end=on_epoch_end,
    )


def without_seconds(history):
    return [{k: v for k, v in row.items() if "seconds" not in k} for row in history]


def stop_after(epoch_to_stop):
    def callback(epoch, row):
        if epoch == epoch_to_stop:
            raise KeyboardInterrupt

    return callback


def test_interrupted_and_resumed_run_equals_uninterrupted_run(tmp_path):
    model = tiny_model(dropout=0.3)
    full = fit(model, tmp_path / "full")

    with pytest.raises(KeyboardInterrupt):
        fit(tiny_model(dropout=0.3), tmp_path / "resumed", on_epoch_end=stop_after(2))
    torch.manual_seed(123)  # a new process starts with other random states
    np.random.seed(123)
    random.seed(123)
    resumed_model, epochs = tiny_model(dropout=0.3), []
    resumed = fit(
        resumed_model,
        tmp_path / "resumed",
        resume=True,
        on_epoch_end=lambda epoch, row: epochs.append(epoch),
    )
    assert epochs == [3, 4]
    final, expected = resumed_model.state_dict(), model.state_dict()
    assert all(torch.equal(final[k], v) for k, v in expected.items())
    assert without_seconds(resumed.history) == without_seconds(full.history)
    assert (resumed.best_epoch, resumed.best_val) == (full.best_epoch, full.best_val)


def test_resuming_with_another_configuration_names_the_keys(tmp_path):
    fit(tiny_model(), tmp_path, epochs=1)
    with pytest.raises(ConfigError, match=r"lr: 0\.05 -> 0\.1"):
        fit(tiny_model(), tmp_path, epochs=1, lr=0.1, resume=True)
    frozen = tiny_model(frozen=True)  # another method: other parameters train
    with pytest.raises(ConfigError, match="trainable"):
        fit(frozen, tmp_path, epochs=1, resume=True)
    fit(tiny_model(), tmp_path, epochs=1, num_workers=0, resume=True)  # same config: fine


def test_resuming_a_finished_run_trains_no_more(tmp_path):
    model = tiny_model()
    first = fit(model, tmp_path, epochs=2)
    again, calls = tiny_model(), []
    second = fit(again, tmp_path, epochs=2, resume=True, on_epoch_end=lambda *a: calls.append(a))
    assert calls == [] and second.history == first.history
    assert all(torch.equal(again.state_dict()[k], v) for k, v in model.state_dict().items())


def test_checkpoint_files(tmp_path):
    fit(tiny_model(), tmp_path, epochs=1)
    ckpt = tmp_path / "checkpoint"
    names = {"model.safetensors", "best.safetensors", "training.pt", "rng-0.pt", "state.json"}
    assert {p.name for p in ckpt.iterdir()} == names
    state = json.loads((ckpt / "state.json").read_text())
    assert state["epoch"] == 1 and len(state["config_hash"]) == 64
    assert state["config"]["precision"] == "fp32" and "sampler" in state
    training = torch.load(ckpt / "training.pt", weights_only=True)
    assert set(training) == {"optimizer", "scheduler", "scaler"}
    assert set(load_file(ckpt / "model.safetensors")) == set(tiny_model().state_dict())


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_model()

    def poison(epoch, row):
        if epoch == 1:
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))

    with pytest.raises(ClinadaptError, match=r"epoch 2, step 1.*learning rate.*fp32"):
        fit(model, tmp_path, epochs=3, on_epoch_end=poison)
    ckpt = tmp_path / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(ckpt / "model.safetensors").values())
    result = fit(tiny_model(), tmp_path, epochs=3, resume=True)  # and training can go on
    assert len(result.history) == 3


def test_a_crash_while_swapping_checkpoints_leaves_one_complete(tmp_path):
    fit(tiny_model(), tmp_path, epochs=2)
    ckpt = tmp_path / "checkpoint"
    # crashed between "checkpoint -> checkpoint.old" and "checkpoint.tmp -> checkpoint"
    os.replace(ckpt, tmp_path / "checkpoint.old")
    (tmp_path / "checkpoint.tmp").mkdir()
    (tmp_path / "checkpoint.tmp" / "model.safetensors").write_bytes(b"half a file")
    calls = []
    result = fit(
        tiny_model(), tmp_path, epochs=2, resume=True, on_epoch_end=lambda *a: calls.append(a)
    )
    assert calls == [] and len(result.history) == 2


@pytest.mark.parametrize(
    ("name", "damage"),
    [
        ("state.json", lambda raw: raw[: len(raw) // 2]),
        ("state.json", lambda raw: b""),
        ("state.json", lambda raw: b"[1, 2]"),
        ("state.json", lambda raw: b'{"epoch": 1}'),
        ("model.safetensors", lambda raw: raw[: len(raw) // 2]),
        ("best.safetensors", lambda raw: b""),
        ("training.pt", lambda raw: b""),
        ("training.pt", lambda raw: raw[: len(raw) // 2]),
        ("rng-0.pt", lambda raw: raw[:100]),
    ],
    ids=[
        "state-half",
        "state-empty",
        "state-list",
        "state-keys",
        "model-half",
        "best-empty",
        "training-empty",
        "training-half",
        "rng-truncated",
    ],
)
def test_a_damaged_checkpoint_file_is_named_on_resume(tmp_path, name, damage):
    fit(tiny_model(), tmp_path, epochs=1)
    ckpt = tmp_path / "checkpoint"
    (ckpt / name).write_bytes(damage((ckpt / name).read_bytes()))
    with pytest.raises(ClinadaptError, match=rf"checkpoint/{re.escape(name)}") as err:
        fit(tiny_model(), tmp_path, epochs=1, resume=True)
    message = str(err.value)
    assert f"delete {ckpt}" in message and "new --out" in message


def test_training_state_of_the_wrong_shape_is_named(tmp_path):
    fit(tiny_model(), tmp_path, epochs=1)
    ckpt = CheckpointDir(tmp_path / "checkpoint")
    torch.save({"optimizer": {}}, ckpt.root / "training.pt")
    with pytest.raises(ClinadaptError, match=r"training\.pt .*scheduler"):
        fit(tiny_model(), tmp_path, epochs=1, resume=True)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    real_save, saved = checkpoint.save_file, []

    def save_until_epoch_two(tensors, path, metadata=None):  # model and best: two per checkpoint
        if len(saved) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        real_save(tensors, path, metadata=metadata)

    monkeypatch.setattr(checkpoint, "save_file", save_until_epoch_two)
    with pytest.raises(ClinadaptError, match=r"No space left.*previous checkpoint .* is kept"):
        fit(tiny_model(), tmp_path, epochs=3)
    ckpt = tmp_path / "checkpoint"
    assert json.loads((ckpt / "state.json").read_text())["epoch"] == 1
    assert not (tmp_path / "checkpoint.tmp").exists()
    monkeypatch.setattr(checkpoint, "save_file", real_save)
    epochs = []
    result = fit(
        tiny_model(), tmp_path, epochs=3, resume=True, on_epoch_end=lambda e, r: epochs.append(e)
    )
    assert epochs == [2, 3] and len(result.history) == 3


@pytest.mark.parametrize("threads_on_resume, warns", [(1, False), (2, True)])
def test_resuming_with_another_thread_count_warns(tmp_path, caplog, threads_on_resume, warns):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with pytest.raises(KeyboardInterrupt):
            fit(tiny_model(), tmp_path, epochs=2, on_epoch_end=stop_after(1))
        torch.set_num_threads(threads_on_resume)
        with caplog.at_level("WARNING", logger="clinadapt.engine.loop"):
            fit(tiny_model(), tmp_path, epochs=2, resume=True)
    finally:
        torch.set_num_threads(before)
    warned = [r.getMessage() for r in caplog.records if "torch threads" in r.getMessage()]
    assert len(warned) == warns
    if warns:
        assert "with 2 torch threads where it trained with 1" in warned[0]
        assert "OMP_NUM_THREADS=1" in warned[0]
