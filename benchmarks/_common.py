"""Shared helpers for benchmark scripts: where results go, which real weights to use."""

from __future__ import annotations

import json
import os
import platform
import resource
import shlex
import sys
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


def peak_mb() -> float:
    """This process's peak resident set size so far (ru_maxrss)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def rss_mb() -> float:
    """Current resident set size (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return 0.0
    return pages * resource.getpagesize() / 2**20


def cpu_name() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What a timing depends on: processor, cores, torch threads and version, bf16 support."""
    import torch

    from clinadapt.engine import bf16_supported

    return {
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "bf16_native": bf16_supported(torch.device("cpu")),
        "amx": bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
        "load_average": list(os.getloadavg()),
    }


def command() -> str:
    """The command line that made a result, as run from the repository root."""
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ]
    return shlex.join([*env, "PYTHONPATH=src", "python", *sys.argv])


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {path}")
    return path


def metric_summaries(row: dict[str, Any], metrics: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Mean, sd over seeds, seed-inclusive 95% interval and undefined cases of a report row."""
    return {
        m: {
            "mean": row[m],
            "sd": row[f"{m}_sd"],
            "interval95": row[f"{m}_ci"],
            "undefined": row[f"{m}_undefined"] or None,
        }
        for m in metrics
    }
