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
