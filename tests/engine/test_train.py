"""train(): outputs, what trains and what must not move, tasks, volumes, options."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clinadapt.adapt.finetune import AdaptedModel
from clinadapt.backbones import create_backbone
from clinadapt.config import from_dict
from clinadapt.data import TaskType
from clinadapt.engine.batches import balanced_sample_weights
from clinadapt.engine.schedule import lr_factor
from clinadapt.engine.train import predict_proba
from clinadapt.engine.train_config import TrainConfig
from clinadapt.errors import ConfigError
from clinadapt.eval import evaluate

from .ddp_script import PREPROCESS, run, tiny_data, tiny_model


def test_adapted_vit_trains_and_writes_outputs(tmp_path):
    torch.manual_seed(0)
    model = AdaptedModel(create_backbone("test_vit", "none"), 2)
    data = tiny_data()
    result = run(model, data, tmp_path, epochs=3, lr=0.01, augment="auto")
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    assert {"train_loss", "lr", "val_auc", "val_acc", "val_loss", "seconds"} <= set(
        result.history[0]
    )
    assert result.best_val["n"] == 24 and 0 <= result.best_val["auc"] <= 1
    assert result.history[result.best_epoch - 1]["val_auc"] == result.best_val["auc"]
    assert result.precision == "fp32" and result.peak_memory_mb > 0 and result.total_s > 0
    assert result.trainable_parameters == model.trainable_parameters() == 130
    assert not model.training and not result.stopped_early
    saved = json.loads((tmp_path / "history.json").read_text())
    assert [r["epoch"] for r in saved] == [1, 2, 3]
    assert (tmp_path / "curves.png").stat().st_size > 1000
    assert (tmp_path / "checkpoint" / "state.json").is_file()
    # the restored best model predicts exactly what validation measured
    scores = predict_proba(
        model,
        data["val"].images,
        task="binary",
        preprocess=PREPROCESS,
        batch_size=16,
        progress=False,
    )
    assert scores.shape == (24, 2)
    assert evaluate(data["val"].labels, scores, "binary")["auc"] == result.best_val["auc"]


def test_best_epoch_weights_are_restored(tmp_path):
    data = tiny_data()
    states = {}
    model = tiny_model()

    def keep(epoch, row):
        states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    result = run(model, data, tmp_path, epochs=4, lr=0.05, select_metric="loss", on_epoch_end=keep)
    losses = [r["val_loss"] for r in result.history]
    assert result.best_epoch == int(np.argmin(losses)) + 1
    best = states[result.best_epoch]
    assert all(torch.equal(v, best[k]) for k, v in model.state_dict().items())


def adapted_cnn():
    torch.manual_seed(0)
    return AdaptedModel(create_backbone("test_cnn", "none"), 2)  # frozen ResNet with BatchNorm


@pytest.mark.parametrize("build", [lambda: tiny_model(frozen=True), adapted_cnn])
def test_frozen_parameters_and_batchnorm_stay_bit_exact(tmp_path, build):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("running_mean" in k for k in before)
    run(model, tiny_data(n_train=32), tmp_path, lr=0.05, weight_decay=0.1, augment="light")
    after = model.state_dict()
    for key, value in before.items():
        if key.startswith("head."):
            assert not torch.equal(after[key], value), key
        else:  # conv weights, BatchNorm affine and running statistics, num_batches_tracked
            assert torch.equal(after[key], value), key


def test_trainable_batchnorm_updates_its_statistics(tmp_path):
    model = tiny_model()
    before = model.features[1].running_mean.clone()
    run(model, tiny_data(), tmp_path, lr=0.05)
    assert not torch.equal(model.features[1].running_mean, before)
    assert model.features[1].num_batches_tracked.item() > 0


def test_multilabel_with_class_weights_and_balanced_sampler(tmp_path):
    data = tiny_data("multi-label", num_classes=3)
    for balance in ("weights", "sampler"):
        result = run(
            tiny_model(3), data, tmp_path / balance, "multi-label", 3, class_balance=balance
        )
        assert np.isfinite(result.history[-1]["train_loss"])
        assert len(result.best_val["per_class_recall"]) == 3


def test_multiclass_label_smoothing_and_step_schedule(tmp_path):
    data = tiny_data("multi-class", num_classes=4, n_train=40)
    result = run(
        tiny_model(4),
        data,
        tmp_path,
        "multi-class",
        4,
        epochs=3,
        label_smoothing=0.1,
        optimizer="adam",
        schedule="step",
        milestones=(2,),
        lr=0.01,
    )
    assert [r["lr"] for r in result.history] == pytest.approx([0.01, 0.01, 0.001])


def test_volumes_train_slice_by_slice(tmp_path):
    data = tiny_data("binary", ndim=3, size=8, n_train=12, n_val=6)
    model = tiny_model()
    result = run(model, data, tmp_path, volume=True, augment="auto", max_slices=4, batch_size=4)
    assert result.best_val["n"] == 6
    scores = predict_proba(
        model,
        data["val"].images,
        task="binary",
        preprocess=PREPROCESS,
        batch_size=4,
        volume=True,
        max_slices=4,
        progress=False,
    )
    assert evaluate(data["val"].labels, scores, "binary")["auc"] == result.best_val["auc"]


def test_without_validation_the_last_epoch_is_kept(tmp_path):
    result = run(tiny_model(), tiny_data(), tmp_path, val=False, epochs=2)
    assert result.best_epoch == 2 and result.best_val == {}
    assert "val_auc" not in result.history[-1]


def test_validation_every_other_epoch(tmp_path):
    result = run(tiny_model(), tiny_data(), tmp_path, epochs=3, eval_every=2)
    assert ["val_auc" in r for r in result.history] == [False, True, True]
    assert result.best_epoch in (2, 3)


def test_early_stopping(tmp_path):
    result = run(tiny_model(), tiny_data(), tmp_path, epochs=6, lr=0.0, early_stopping_patience=2)
    assert result.stopped_early and result.best_epoch == 1 and len(result.history) == 3


def test_grad_accumulation_and_sgd(tmp_path):
    result = run(tiny_model(), tiny_data(), tmp_path, grad_accumulation=2, optimizer="sgd")
    assert np.isfinite(result.history[-1]["train_loss"])


def test_bf16_autocast_on_cpu(tmp_path):
    result = run(tiny_model(), tiny_data(), tmp_path, precision="bf16", epochs=1)
    assert result.precision == "bf16" and np.isfinite(result.history[0]["train_loss"])


def test_gradient_checkpointing_gives_the_same_weights(tmp_path):
    data = tiny_data(n_train=16, n_val=4)
    finals = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = AdaptedModel(create_backbone("test_vit", "none"), 2)
        model.backbone.model.blocks[-1].requires_grad_(True)
        run(
            model,
            data,
            tmp_path / str(checkpointing),
            epochs=1,
            batch_size=8,
            gradient_checkpointing=checkpointing,
        )
        finals.append(model.state_dict())
        assert not model.backbone.model.grad_checkpointing  # switched off again afterwards
    for key, value in finals[0].items():
        torch.testing.assert_close(finals[1][key], value, rtol=1e-5, atol=1e-6)


def _adapted(method: str, backbone: str = "test_vit") -> AdaptedModel:
    from clinadapt.adapt import create_method

    torch.manual_seed(0)
    return create_method(method).apply(AdaptedModel(create_backbone(backbone, "none"), 2))


def test_peft_methods_checkpoint_by_default_with_the_same_weights(tmp_path):
    """LoRA keeps the backbone frozen: recomputing activations saves memory, changes nothing."""
    data = tiny_data(n_train=16, n_val=4)
    models, results = [], []
    for setting in ("auto", False):
        model = _adapted("lora")
        results.append(run(model, data, tmp_path / str(setting), epochs=1, batch_size=8,
                           gradient_checkpointing=setting))  # fmt: skip
        models.append(model)
        assert not model.backbone.model.model.grad_checkpointing  # switched off afterwards
    assert [r.gradient_checkpointing for r in results] == [True, False]
    trained = models[0].trainable_state_dict()
    assert any("lora_B" in key and value.abs().max() > 0 for key, value in trained.items())
    for key, value in models[1].trainable_state_dict().items():
        torch.testing.assert_close(trained[key], value, rtol=1e-6, atol=1e-7)
    state = json.loads((tmp_path / "auto" / "checkpoint" / "state.json").read_text())
    assert state["config"]["gradient_checkpointing"] is True


def test_frozen_parameters_get_no_gradient_and_no_optimiser_state(tmp_path):
    model = _adapted("lora")
    run(model, tiny_data(n_train=16, n_val=4), tmp_path, epochs=1, batch_size=8)
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)
    saved = torch.load(tmp_path / "checkpoint" / "training.pt", weights_only=True)
    state = saved["optimizer"]["state"]
    assert len(state) == sum(p.requires_grad for p in model.parameters())


def test_checkpointing_stays_off_where_it_would_change_or_not_help(tmp_path):
    data = tiny_data(n_train=16, n_val=4)
    full = run(_adapted("full"), data, tmp_path / "full", epochs=1, batch_size=8)
    assert full.gradient_checkpointing is False  # full fine-tuning: default unchanged
    # BitFit on a randomly initialised CNN trains batch norm, whose running statistics update:
    # a recomputed forward would update them twice
    bitfit = run(_adapted("bitfit", "test_cnn"), data, tmp_path / "bitfit", epochs=1,
                 batch_size=8)  # fmt: skip
    assert bitfit.gradient_checkpointing is False
    frozen_stats = run(_adapted("bitfit", "test_cnn"), data, tmp_path / "frozen", epochs=1,
                       batch_size=8, norm_statistics="frozen")  # fmt: skip
    assert frozen_stats.gradient_checkpointing is True
    tiny = run(tiny_model(frozen=True), data, tmp_path / "tiny", epochs=1, batch_size=8)
    assert tiny.gradient_checkpointing is False  # no set_grad_checkpointing: nothing to do


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="adamw"):
        TrainConfig(optimizer="adamx")
    with pytest.raises(ConfigError, match="unknown option"):
        from_dict(TrainConfig, {"learning_rate": 0.1})
    assert from_dict(TrainConfig, {"milestones": [50, 75], "lr": 1}).milestones == (50, 75)
    with pytest.raises(ConfigError, match="CUDA"):
        run(tiny_model(), tiny_data(), tmp_path, precision="fp16")
    with pytest.raises(ConfigError, match="set_grad_checkpointing"):
        run(tiny_model(), tiny_data(), tmp_path, gradient_checkpointing=True)
    with pytest.raises(ConfigError, match="true, false or auto"):
        from_dict(TrainConfig, {"gradient_checkpointing": "sometimes"})
    for value in (True, False, "auto"):
        assert from_dict(TrainConfig, {"gradient_checkpointing": value}).gradient_checkpointing == (
            value
        )
    frozen = tiny_model()
    frozen.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        run(frozen, tiny_data(), tmp_path)


def test_schedules():
    cosine = lr_factor("cosine", steps_per_epoch=10, epochs=5, warmup_epochs=1)
    assert cosine(0) == pytest.approx(0.1) and cosine(9) == pytest.approx(1.0)
    assert cosine(29) == pytest.approx(0.5, abs=0.05) and cosine(49) < 0.01
    medmnist = lr_factor("step", 10, 100, milestones=(50, 75), gamma=0.1)
    assert [medmnist(s) for s in (0, 499, 500, 749, 750)] == pytest.approx([1, 1, 0.1, 0.1, 0.01])
    assert lr_factor("constant", 10, 5)(37) == 1.0


def test_balanced_sampling_weights_equalise_classes():
    labels = np.array([[0]] * 90 + [[1]] * 10)
    w = balanced_sample_weights(labels, TaskType("binary"), 2)
    assert w[labels[:, 0] == 1].sum() == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("pretrained", "mode", "frozen"),
    [
        (True, "auto", True),
        (False, "auto", False),
        (False, "frozen", True),
        (True, "update", False),
    ],
)
def test_norm_statistics_of_fully_trained_models(tmp_path, pretrained, mode, frozen):
    from clinadapt.adapt import create_method

    model = create_method("full").apply(adapted_cnn())
    model.backbone.is_pretrained = pretrained
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_mean" in k}
    weights = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("conv1.weight")}
    run(model, tiny_data(n_train=32), tmp_path, lr=0.05, norm_statistics=mode)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in stats.items()) is frozen
    assert not any(torch.equal(after[k], v) for k, v in weights.items())  # the weights train
    with pytest.raises(ConfigError, match="norm_statistics"):
        run(adapted_cnn(), tiny_data(), tmp_path / "x", norm_statistics="fixed")
