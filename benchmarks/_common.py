"""Shared helpers for benchmark scripts: where results go, which real weights to use."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
SHARED = Path(__file__).resolve().parents[2] / "shared"


def default_data_root() -> str | None:
    root = os.environ.get("CLINADAPT_DATA") or SHARED / "data" / "medmnist"
    return str(root) if Path(root).is_dir() else None


def default_weights(architecture: str = "mobilenetv2_100") -> str:
    """Local safetensors weights for ``architecture`` when present, else the random control."""
    from clinadapt.runner.presets import find_local_weights

    root = os.environ.get("CLINADAPT_WEIGHTS") or SHARED / "weights"
    found = find_local_weights(architecture, root)
    return str(found) if found else "none"


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
    return path
