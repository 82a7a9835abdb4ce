"""train() and predict_masks() with the segmentation task, on bright squares in noise: the loss
falls, validation Dice chooses the epoch, predictions come back at each case's own size."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clinadapt.adapt import create_method
from clinadapt.adapt.finetune import AdaptedModel
from clinadapt.backbones import create_backbone
from clinadapt.data.transforms import PairResize, Preprocess, SegmentationPreprocess
from clinadapt.engine.predict import predict_masks
from clinadapt.engine.train import train
from clinadapt.engine.train_config import TrainConfig
from clinadapt.errors import ConfigError
from clinadapt.eval.segmentation import case_metrics
from clinadapt.tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")

PRE = SegmentationPreprocess(
    PairResize(16, "linear"), Preprocess(16, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
)
FAST = {"precision": "fp32", "device": "cpu", "augment": "none", "select_metric": "dice"}


def squares(n: int, seed: int, sizes=(14, 16, 20, 24)) -> tuple[list, list]:
    """Grayscale cases of varying sizes: a bright square on dark noise, the mask its square."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for i in range(n):
        h, w = sizes[i % len(sizes)], sizes[(i + 1) % len(sizes)]
        image = rng.integers(0, 80, (h, w), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        s = int(rng.integers(4, 8))
        y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
        mask[y : y + s, x : x + s] = 1
        image[mask == 1] = rng.integers(170, 255, int(mask.sum()))
        images.append(image)
        masks.append(mask)
    return images, masks


def unet() -> AdaptedModel:
    torch.manual_seed(0)
    model = AdaptedModel(create_backbone("test_unet", "none"), 2, "segmentation", "decoder")
    return create_method("full").apply(model)


def fit(model, out_dir, train_data=None, val_data=None, resume=False, on_epoch_end=None, **options):
    config = TrainConfig(**{**FAST, "epochs": 2, "batch_size": 8, **options})
    return train(
        model,
        train_data or squares(16, 0),
        val_data or squares(8, 1),
        task="segmentation",
        num_classes=2,
        preprocess=PRE,
        config=config,
        out_dir=out_dir,
        resume=resume,
        on_epoch_end=on_epoch_end,
        progress=False,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    model = unet()
    out = tmp_path_factory.mktemp("seg")
    result = fit(model, out, epochs=10, lr=0.03, warmup_epochs=0)
    return model, result, out


def test_training_lowers_the_loss_and_records_validation_dice(trained):
    model, result, out = trained
    history = result.history
    assert [r["epoch"] for r in history] == list(range(1, 11))
    assert {k for k in history[0] if k.startswith("val_")} == {"val_loss", "val_dice"}
    assert history[-1]["train_loss"] < 0.5 * history[0]["train_loss"]
    dice = [r["val_dice"] for r in history]
    assert result.best_epoch == int(np.argmax(dice)) + 1  # the first epoch of the best Dice
    assert result.best_val["dice"] == max(dice) > 0.8
    assert set(result.best_val) == {"dice", "loss"}
    assert result.trainable_parameters == sum(p.numel() for p in model.parameters())
    saved = json.loads((out / "history.json").read_text())
    assert [r["val_dice"] for r in saved] == dice
    assert not model.training


def test_the_best_epoch_is_chosen_by_dice_and_its_weights_restored(tmp_path, monkeypatch):
    """Scripted validation: Dice peaks at epoch 2, the loss is lowest at epoch 3."""
    task = TASKS.get("segmentation")
    script = iter([(0.2, 0.9), (0.9, 0.5), (0.5, 0.1)])

    def scripted(parts, labels, task_type):
        assert parts.shape == (8, 4)  # one row per validation case: 3 counts + cross-entropy
        dice, loss = next(script)
        return {"dice": dice, "loss": loss}

    monkeypatch.setattr(task, "validation_metrics", scripted)
    model, states = unet(), {}

    def keep(epoch, row):
        states[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    result = fit(model, tmp_path / "dice", epochs=3, on_epoch_end=keep)
    assert result.best_epoch == 2 and result.best_val == {"dice": 0.9, "loss": 0.5}
    assert all(torch.equal(v, states[2][k]) for k, v in model.state_dict().items())
    assert not torch.equal(states[2]["head.layers.0.weight"], states[3]["head.layers.0.weight"])
    script = iter([(0.2, 0.9), (0.9, 0.5), (0.5, 0.1)])
    result = fit(unet(), tmp_path / "loss", epochs=3, select_metric="loss")
    assert result.best_epoch == 3


def test_a_finished_run_resumes_to_the_same_result(tmp_path):
    first = fit(unet(), tmp_path, epochs=2)
    again = fit(unet(), tmp_path, epochs=2, resume=True)
    assert again.history == first.history and again.best_epoch == first.best_epoch
    assert again.best_val == first.best_val


@pytest.mark.parametrize(
    "options, match",
    [
        ({"select_metric": "auc"}, r"'auc' is not a segmentation validation metric.*'dice'"),
        ({"class_balance": "sampler"}, r"class_balance='sampler'.*segmentation"),
        ({"class_balance": "weights"}, "segmentation loss"),
        ({"label_smoothing": 0.1}, "segmentation loss"),
    ],
)
def test_classification_options_are_refused(tmp_path, options, match):
    with pytest.raises(ConfigError, match=match):
        fit(unet(), tmp_path, epochs=1, **options)


def test_a_plain_preprocess_is_refused_for_masks(tmp_path):
    config = TrainConfig(**{**FAST, "epochs": 1})
    with pytest.raises(ConfigError, match="PairPreprocess .*, not Preprocess"):
        train(
            unet(),
            squares(4, 0),
            None,
            task="segmentation",
            num_classes=2,
            preprocess=PRE.normalise,
            config=config,
            out_dir=tmp_path,
            progress=False,
        )


def test_predicted_masks_are_at_each_case_s_own_size_and_mostly_right(trained):
    model = trained[0]
    images, masks = squares(6, 2, sizes=(13, 18, 22))
    preds = predict_masks(model, images, preprocess=PRE, batch_size=4, progress=False)
    assert [p.shape for p in preds] == [m.shape for m in masks]
    assert len({p.shape for p in preds}) == 3 and all(p.dtype == np.uint8 for p in preds)
    dice = [case_metrics(p, m, 2)["mean_fg_dice"] for p, m in zip(preds, masks, strict=True)]
    assert np.mean(dice) > 0.7
    assert np.mean([(p == m).mean() for p, m in zip(preds, masks, strict=True)]) > 0.95
    # each is the argmax at the network's size, brought back by the pair's restore
    for image, pred in zip(images, preds, strict=True):
        x, _ = PRE([image])
        with torch.no_grad():
            at_network = model(x).argmax(dim=1)[0].numpy().astype(np.uint8)
        np.testing.assert_array_equal(pred, PRE.pair.restore(at_network, image.shape))


def test_slices_are_predicted_as_images_and_stacked_into_the_volume(trained):
    model = trained[0]
    images, _ = squares(5, 3, sizes=(18,))
    volume = np.stack(images)  # (5, 18, 18)
    other = np.stack(squares(3, 4, sizes=(14, 14))[0])  # (3, 14, 14)
    preds = predict_masks(
        model, [volume, other], preprocess=PRE, batch_size=2, slices=True, progress=False
    )
    assert [p.shape for p in preds] == [(5, 18, 18), (3, 14, 14)]
    one_by_one = predict_masks(model, images, preprocess=PRE, batch_size=1, progress=False)
    np.testing.assert_array_equal(preds[0], np.stack(one_by_one))
    assert preds[0].any()


def test_predict_masks_options_are_checked(trained):
    with pytest.raises(ConfigError, match="batch_size"):
        predict_masks(trained[0], squares(1, 0)[0], preprocess=PRE, batch_size=0)
    with pytest.raises(ConfigError, match="precision"):
        predict_masks(trained[0], squares(1, 0)[0], preprocess=PRE, precision="fp8")
