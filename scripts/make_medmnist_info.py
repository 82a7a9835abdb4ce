"""Write src/clinadapt/data/medmnist_info.json from ``medmnist.INFO``.

clinadapt reads the JSON at run time instead of importing medmnist, because importing
``medmnist.info`` creates a folder in the home directory. Rerun this script after upgrading
medmnist; tests/data/test_registry.py checks that the JSON still agrees with ``medmnist.INFO``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "src" / "clinadapt" / "data" / "medmnist_info.json"

TASKS = {
    "binary-class": "binary",
    "multi-class": "multi-class",
    "multi-label, binary-class": "multi-label",
    "ordinal-regression": "ordinal",
}

# Imaging modality per dataset, from the MedMNIST v2 paper (Yang et al., Scientific Data 2023).
MODALITIES = {
    "pathmnist": "colon pathology",
    "chestmnist": "chest X-ray",
    "dermamnist": "dermatoscope",
    "octmnist": "retinal OCT",
    "pneumoniamnist": "chest X-ray",
    "retinamnist": "fundus camera",
    "breastmnist": "breast ultrasound",
    "bloodmnist": "blood cell microscope",
    "tissuemnist": "kidney cortex microscope",
    "organamnist": "abdominal CT",
    "organcmnist": "abdominal CT",
    "organsmnist": "abdominal CT",
    "organmnist3d": "abdominal CT",
    "nodulemnist3d": "chest CT",
    "adrenalmnist3d": "shape from abdominal CT",
    "fracturemnist3d": "chest CT",
    "vesselmnist3d": "shape from brain MRA",
    "synapsemnist3d": "electron microscope",
}


def record(name: str, raw: dict[str, Any]) -> dict[str, Any]:
    """One dataset in the shape of ``clinadapt.data.info.DatasetInfo``."""
    ndim = 3 if name.endswith("3d") else 2
    sizes = (28, 64) if ndim == 3 else (28, 64, 128, 224)
    suffix = {s: "" if s == 28 else f"_{s}" for s in sizes}
    return {
        "task": TASKS[raw["task"]],
        "labels": [raw["label"][str(i)] for i in range(len(raw["label"]))],
        "channels": raw["n_channels"],
        "ndim": ndim,
        "splits": dict(raw["n_samples"]),
        "sizes": list(sizes),
        "urls": {str(s): raw[f"url{suffix[s]}"] for s in sizes},
        "md5": {str(s): raw[f"MD5{suffix[s]}"] for s in sizes},
        "description": raw["description"],
        "license": raw["license"],
        "modality": MODALITIES[name],
    }


def main() -> None:
    import medmnist
    from medmnist.info import INFO

    data = {
        "source": f"medmnist {medmnist.__version__} medmnist.INFO",
        "datasets": {name: record(name, raw) for name, raw in INFO.items()},
    }
    OUT.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(data['datasets'])} datasets to {OUT}")


if __name__ == "__main__":
    main()
