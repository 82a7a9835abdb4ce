"""Named grids; ``quickstart`` is the README's main job and runs offline on a laptop CPU."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from clinadapt.errors import ClinadaptError
from clinadapt.runner.bench import GridConfig

QUICKSTART_DATASET = "breastmnist"
QUICKSTART_BACKBONE = "mobilenetv2_100"


@dataclass
class Preset:
    grid: GridConfig
    notices: list[str]


def find_local_weights(architecture: str, root: str | Path | None = None) -> Path | None:
    """The first folder under ``root`` (default $CLINADAPT_WEIGHTS) holding ``architecture``."""
    root = root or os.environ.get("CLINADAPT_WEIGHTS")
    if not root or not Path(root).is_dir():
        return None
    for config in sorted(Path(root).glob("*/config.json")):
        try:
            arch = json.loads(config.read_text()).get("architecture")
        except (OSError, json.JSONDecodeError):
            continue
        if arch == architecture and (config.parent / "model.safetensors").exists():
            return config.parent
    return None


def _dataset_available(name: str, data_root: str | None) -> tuple[bool, str]:
    from clinadapt.data import load_dataset

    try:
        load_dataset(name, root=data_root, size=28, download=True)
    except ClinadaptError as err:
        return False, str(err)
    return True, ""


def _hub_weights_available(backbone: str) -> tuple[bool, str]:
    from clinadapt.backbones import create_backbone

    try:
        create_backbone(backbone, "pretrained")
    except ClinadaptError as err:
        return False, str(err)
    return True, ""


def quickstart(data_root: str | None = None, weights_root: str | None = None) -> Preset:
    """BreastMNIST, MobileNetV2 pretrained versus untrained control, the three cheap methods.

    Uses real data and weights when it finds them ($CLINADAPT_DATA, $CLINADAPT_WEIGHTS),
    downloads them when online, and otherwise falls back to synthetic data or random weights
    with a notice that the numbers are then only a smoke test.
    """
    notices = []
    dataset = QUICKSTART_DATASET
    ok, why = _dataset_available(dataset, data_root)
    if not ok:
        dataset = "synthetic-binary"
        notices.append(
            f"{QUICKSTART_DATASET} is not available ({why}). Falling back to synthetic data: "
            "the numbers below are only a smoke test, not a medical result."
        )
    local = find_local_weights(QUICKSTART_BACKBONE, weights_root)
    if local is not None:
        weights = [str(local), "none"]
    else:
        ok, why = _hub_weights_available(QUICKSTART_BACKBONE)
        if ok:
            weights = ["pretrained", "none"]
        else:
            weights = ["none"]
            notices.append(
                f"No pretrained {QUICKSTART_BACKBONE} weights found (set CLINADAPT_WEIGHTS to a "
                f"folder of safetensors weights, or go online): {why} Only the untrained control "
                "runs: the numbers are only a smoke test."
            )
    grid = GridConfig(
        datasets=[dataset],
        backbones=[QUICKSTART_BACKBONE],
        weights=weights,
        methods=["knn", "prototype", "linear"],
        shots=["1", "5", "10", "all"],
        seeds=3,
        base={"data_root": data_root, "resize": "bilinear"},
    )
    return Preset(grid=grid, notices=notices)


MEDMNIST_V2_TRAIN = {
    "epochs": 100,
    "batch_size": 128,
    "optimizer": "adam",
    "lr": 0.001,
    "weight_decay": 0.0,
    "schedule": "step",
    "milestones": [50, 75],
    "gamma": 0.1,
    "warmup_epochs": 0,
    "select_metric": "auc",
    "early_stopping_patience": 0,
    "clip_grad_norm": 0.0,
    "augment": "none",
}
"""The MedMNIST v2 baseline recipe (Yang et al., Sci. Data 2023): ResNet-18 from scratch,
100 epochs, batch 128, Adam lr 0.001 decayed by 0.1 at epochs 50 and 75, model chosen on
validation AUC."""

MEDMNIST_V2_PUBLISHED = {
    ("breastmnist", "resnet18_28"): {"auc": 0.901, "acc": 0.863},
    ("pneumoniamnist", "resnet18_28"): {"auc": 0.944, "acc": 0.854},
    ("retinamnist", "resnet18_28"): {"auc": 0.717, "acc": 0.524},
    ("adrenalmnist3d", "resnet18_2_5d"): {"auc": 0.718, "acc": 0.772},
    ("adrenalmnist3d", "resnet18_3d"): {"auc": 0.827, "acc": 0.721},
}


def medmnist_v2(
    data_root: str | None = None,
    datasets: list[str] | None = None,
    epochs: int | None = None,
    seeds: int = 1,
) -> list[Preset]:
    """Grids reproducing the MedMNIST v2 ResNet-18 (28) from-scratch baselines, 2D and 3D;
    ``seeds`` > 1 shows how much of a gap to the paper's single run is seed noise."""
    train = {**MEDMNIST_V2_TRAIN, **({"epochs": epochs} if epochs else {})}
    wanted = datasets or sorted({d for d, _ in MEDMNIST_V2_PUBLISHED})
    presets = []
    for dataset in wanted:
        backbones = [b for d, b in MEDMNIST_V2_PUBLISHED if d == dataset]
        if not backbones:
            raise ClinadaptError(
                f"the medmnist-v2 preset has no published baseline for {dataset!r}; "
                f"choose from {sorted({d for d, _ in MEDMNIST_V2_PUBLISHED})}"
            )
        grid = GridConfig(
            datasets=[dataset],
            backbones=backbones,
            weights=["none"],
            methods=["full"],
            shots=["all"],
            seeds=seeds,
            base={"data_root": data_root, "resize": "nearest", "train": train},
        )
        notices = (
            []
            if train["epochs"] == 100
            else [
                f"{train['epochs']} epochs instead of the paper's 100: not a faithful reproduction"
            ]
        )
        presets.append(Preset(grid=grid, notices=notices))
    return presets
