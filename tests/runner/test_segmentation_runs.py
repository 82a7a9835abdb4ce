"""Segmentation runs end to end on tiny synthetic folders (Kvasir-like image/mask PNGs, MSD-like
NIfTI volumes), and what a segmentation option does to a run's identity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from clinadapt.data import few_shot_cases, load_dataset
from clinadapt.engine import predict
from clinadapt.errors import ConfigError
from clinadapt.eval.segmentation import case_metrics
from clinadapt.runner.experiment import ExperimentConfig, run_experiment
from clinadapt.runner.identity import resolved_options, run_id
from clinadapt.runner.records import write_json_atomic
from clinadapt.tasks import TASKS
from clinadapt.tasks.segmentation import NSD_TOLERANCE

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = TASKS.get("segmentation")
SPLITS = ["train"] * 7 + ["val"] * 2 + ["test"] * 4
EMPTY = (1, 11)  # a training and a test case without foreground
FAST = {"epochs": 2, "batch_size": 4, "lr": 0.01}


def pairs_folder(root: Path) -> Path:
    """12 colour cases of varying sizes with 0/255 masks (a bright square), split by cases.csv."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["id,split"]
    for i, split in enumerate(SPLITS):
        h, w = 16 + 2 * (i % 4), 18 + 3 * (i % 3)
        image = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        if i not in EMPTY:
            s = 5 + i % 3
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            mask[y : y + s, x : x + s] = 255
        image[mask > 0] = 220
        Image.fromarray(image).save(root / "images" / f"c{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"c{i:02d}.png")
        rows.append(f"c{i:02d},{split}")
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    return root


def msd_folder(root: Path, n: int = 10) -> Path:
    """MSD-style NIfTI volumes (file axes x, y, z; arrays read as z, y, x), 0.8 x 0.8 x 2 mm."""
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(1)
    for i in range(n):
        shape = (10 + i % 3, 12, 6 + i % 2)
        image = rng.integers(0, 300, shape).astype(np.int16)
        label = np.zeros(shape, np.uint8)
        label[2:6, 3:8, 1:4] = 1
        image[label == 1] += 700
        for sub, array in (("imagesTr", image), ("labelsTr", label)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            affine = np.diag([0.8, 0.8, 2.0, 1.0])
            nib.save(nib.Nifti1Image(array, affine), str(root / sub / f"case_{i:03d}.nii.gz"))
    return root


def run_with_spy(cfg: ExperimentConfig, run_dir: Path) -> tuple[dict, dict]:
    """The record of a run, and what predict_masks was asked and returned during it."""
    seen: dict = {}
    real = predict.predict_masks

    def spy(model, images, **kwargs):
        seen.update(kwargs, out=real(model, images, **kwargs))
        return seen["out"]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(predict, "predict_masks", spy)
        record = run_experiment(cfg, run_dir=run_dir, progress=False)
    return record, seen


def same(a, b) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return a == b


def check_cases(record: dict, seen: dict, dataset) -> None:
    """The record's cases are the test split's, each scored at its own size and spacing."""
    test = dataset["test"]
    cases = record["metrics"]["test"]["cases"]
    assert [c["id"] for c in cases] == [m["id"] for m in test.meta]
    assert [p.shape for p in seen["out"]] == [m.shape for m in test.labels]
    num_classes = dataset.info.num_classes
    for pred, truth, meta, case in zip(seen["out"], test.labels, test.meta, cases, strict=True):
        expected = case_metrics(
            pred, truth, num_classes, spacing=meta["spacing"], nsd_tolerance_mm=NSD_TOLERANCE
        )
        assert all(same(case[k], v) for k, v in expected.items())
    metrics = record["metrics"]
    means = {m: np.array([c[f"mean_fg_{m}"] for c in cases]) for m in ("dice", "hd95", "nsd")}
    for metric, values in means.items():
        assert metrics["test"]["n_undefined"][metric] == int(np.isnan(values).sum())
        if not np.isnan(values).all():
            assert metrics["test"][metric] == pytest.approx(np.nanmean(values))
    assert metrics["test"]["n_cases"] == len(test)
    _, ci = TASK.summarise(cases, record["config"]["bootstrap"], record["config"]["seed"])
    assert set(metrics["test_ci95"]) == {"dice", "iou", "hd95", "nsd"}
    assert all(same(a, b) for m in ci for a, b in zip(metrics["test_ci95"][m], ci[m], strict=True))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return pairs_folder(tmp_path_factory.mktemp("data") / "polyps")


@pytest.fixture(scope="module")
def unet_run(pairs, tmp_path_factory):
    cfg = ExperimentConfig(
        dataset=str(pairs),
        backbone="test_unet",
        weights="none",
        method="full",
        train=FAST,
        bootstrap=20,
    )
    run_dir = tmp_path_factory.mktemp("runs") / "unet"
    record, seen = run_with_spy(cfg, run_dir)
    return record, seen, run_dir


def test_a_unet_run_records_per_case_metrics_with_intervals(unet_run, pairs):
    record, seen, _ = unet_run
    assert record["task"] == "segmentation" and record["dataset"]["task"] == "segmentation"
    assert record["kind"] == "finetune" and record["method"]["head"] == "decoder"
    test = record["metrics"]["test"]
    assert {"dice", "iou", "hd95", "nsd", "n_cases", "n_undefined", "cases"} <= set(test)
    assert test["distance_unit"] == "pixel" and test["nsd_tolerance"] == NSD_TOLERANCE
    assert 0 <= test["dice"] <= 1 and test["n_cases"] == 4
    check_cases(record, seen, load_dataset(str(pairs)))
    assert seen["slices"] is False and seen["precision"] == record["preprocessing"]["precision"]
    assert len(record["history"]) == 2 and "val_dice" in record["history"][0]
    assert set(record["metrics"]["val"]) == {"dice", "loss"}
    assert record["method"]["train"]["select_metric"] == "dice"
    assert record["preprocessing"]["resize"] == "linear" and record["preprocessing"]["size"] == 32
    assert (
        record["preprocessing"]["mask"] == "nearest" and record["preprocessing"]["slices"] is None
    )


def test_a_run_counts_empty_masks_and_the_labels_it_used(unet_run):
    record = unet_run[0]
    assert record["dataset"]["empty_masks"] == {"train": 1, "val": 0, "test": 1}
    assert record["dataset"]["split_sizes"] == {"train": 7, "val": 2, "test": 4}
    assert record["labels_used"] == {"train": 7, "val": 2, "total": 9}
    assert record["shots"]["actual_cases"] == 7


def test_overlays_are_pictures_next_to_the_run(unet_run):
    record, _, run_dir = unet_run
    assert set(record["overlays"]) == {"best", "median", "worst"}
    for name in record["overlays"].values():
        path = run_dir / name
        assert path.parent == run_dir / "overlays" and path.suffix == ".png"
        with Image.open(path) as im:
            assert im.width > im.height > 0
    assert (run_dir / "adapter").is_dir() and (run_dir / "history.json").is_file()


def test_the_record_is_written_as_json(unet_run, tmp_path):
    record = unet_run[0]
    write_json_atomic(tmp_path / "record.json", record)
    again = json.loads((tmp_path / "record.json").read_text())
    assert again["metrics"]["test"]["n_cases"] == 4 and len(again["metrics"]["test"]["cases"]) == 4


def test_a_head_on_a_frozen_cnn_trains_only_the_decoder_on_few_cases(pairs, tmp_path):
    cfg = ExperimentConfig(
        dataset=str(pairs),
        backbone="test_cnn",
        weights="none",
        method="head",
        shots="3",
        train=FAST,
        precision="fp32",
        bootstrap=20,
    )
    record, seen = run_with_spy(cfg, tmp_path)
    method = record["method"]
    assert method["head"] == "decoder" and method["trainable_backbone_parameters"] == 0
    assert method["fitted_parameters"] > 0
    support = few_shot_cases(7, 3, 0)
    ds = load_dataset(str(pairs))
    assert record["labels_used"] == {"train": 3, "val": 2, "total": 5}
    empty = sum(int(not ds["train"].labels[int(i)].any()) for i in support)
    assert empty == 0  # the empty training case is not among the 3 drawn, so it is not counted
    assert record["dataset"]["empty_masks"] == {"train": empty, "val": 0, "test": 1}
    check_cases(record, seen, ds)


def test_frozen_feature_methods_are_refused_for_segmentation(pairs, tmp_path):
    cfg = ExperimentConfig(dataset=str(pairs), backbone="test_cnn", weights="none", method="knn")
    with pytest.raises(ConfigError, match=r"'knn' fits on pooled features.*use a trained head"):
        run_experiment(cfg, run_dir=tmp_path)


def test_2d_images_cannot_reach_a_3d_backbone(pairs, tmp_path):
    cfg = ExperimentConfig(
        dataset=str(pairs), backbone="test_unet3d", weights="none", method="full", train=FAST
    )
    with pytest.raises(ConfigError, match="takes volumes but .* holds 2D images"):
        run_experiment(cfg, run_dir=tmp_path, progress=False)


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    return msd_folder(tmp_path_factory.mktemp("data") / "Task09_Tiny")


@pytest.mark.parametrize(
    "backbone, resize, slices",
    [("test_unet", "auto", True), ("test_unet3d", "pad", False)],
    ids=["2d-slices", "3d-pad"],
)
def test_volumes_run_through_2d_and_3d_backbones(msd, tmp_path, backbone, resize, slices):
    cfg = ExperimentConfig(
        dataset=str(msd),
        backbone=backbone,
        weights="none",
        method="full",
        resize=resize,
        train=FAST,
        precision="fp32",
        bootstrap=20,
    )
    record, seen = run_with_spy(cfg, tmp_path)
    ds = load_dataset(str(msd))
    assert ds.info.ndim == 3 and record["dataset"]["ndim"] == 3
    assert seen["slices"] is slices
    assert all(p.ndim == 3 for p in seen["out"])
    check_cases(record, seen, ds)
    assert record["metrics"]["test"]["distance_unit"] == "mm"
    assert record["labels_used"]["train"] == len(ds["train"])  # cases, not slices
    pre = record["preprocessing"]
    if slices:
        assert pre["slices"] == "axial slices through a 2D backbone" and "ndim" not in pre
    else:
        assert pre["slices"] is None and pre["ndim"] == 3 and pre["mask"] == "zero padding"
    assert all((tmp_path / p).is_file() for p in record["overlays"].values())


def test_volumes_reach_a_2d_backbone_only_as_axial_slices(msd, tmp_path):
    cfg = ExperimentConfig(
        dataset=str(msd),
        backbone="test_unet",
        weights="none",
        method="full",
        volume_mode="coronal",
        train=FAST,
    )
    with pytest.raises(ConfigError, match="volume_mode='coronal'.*volume_mode=axial"):
        run_experiment(cfg, run_dir=tmp_path, progress=False)


# Identity --------------------------------------------------------------------------------------


def test_classification_run_ids_are_those_before_segmentation():
    cfg = ExperimentConfig(dataset="synthetic-binary", method="knn", shots="5")
    options = resolved_options(cfg)
    assert options["resize"] == "nearest" and "head" not in options
    assert run_id(cfg) == "4a4bfa0f0c"  # the id such a run had before tasks could differ
    assert run_id(
        ExperimentConfig(dataset="synthetic-binary", method="knn", shots="5", head="linear")
    ) == run_id(cfg)
    trained = resolved_options(ExperimentConfig(dataset="synthetic-binary", method="lora"))
    assert trained["resize"] == "nearest" and "head" not in trained
    assert trained["train"]["select_metric"] == "auc"


def test_segmentation_runs_resolve_their_task_s_defaults(pairs, msd):
    for folder in (pairs, msd):
        options = resolved_options(ExperimentConfig(dataset=str(folder), method="full"))
        assert options["resize"] == "bilinear" and options["head"] == "decoder"
        assert options["train"]["select_metric"] == "dice"
    base = ExperimentConfig(dataset=str(pairs), method="head")
    linear = ExperimentConfig(dataset=str(pairs), method="head", head="linear")
    assert resolved_options(linear)["head"] == "linear" and run_id(linear) != run_id(base)
    chosen = ExperimentConfig(dataset=str(pairs), method="full", train={"select_metric": "loss"})
    assert resolved_options(chosen)["train"]["select_metric"] == "loss"
    explicit = ExperimentConfig(
        dataset=str(pairs), method="full", head="decoder", resize="bilinear"
    )
    assert run_id(explicit) == run_id(ExperimentConfig(dataset=str(pairs), method="full"))


def test_a_decoder_head_on_a_classification_dataset_is_refused():
    cfg = ExperimentConfig(dataset="synthetic-binary", method="lora", head="decoder")
    with pytest.raises(ConfigError, match="head='decoder'.*classification"):
        run_id(cfg)
