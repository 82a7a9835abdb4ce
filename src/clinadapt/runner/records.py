"""One JSON record per run: the only input reports are built from."""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import platform
import resource
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clinadapt.errors import ConfigError
from clinadapt.paths import share_like_new_file

if TYPE_CHECKING:
    from clinadapt.tasks import Task

log = logging.getLogger(__name__)
RECORD_VERSION = 2  # 2: run identity, labels used, setup and run time apart
KINDS = ("frozen", "finetune", "prompted", "pretrain", "align")
DESCRIBE_BACKBONES = ("pretrain", "align")
"""Record kinds of commands that make weights, not adapted models: reports leave them out."""
PACKAGES = ("clinadapt", "torch", "torchvision", "timm", "numpy", "scikit-learn", "safetensors")


def is_main_process() -> bool:
    """False on the non-zero ranks of ``accelerate launch`` / ``torchrun``, which must not write
    the run's files a second time."""
    from clinadapt.engine.distributed import rank

    return rank() == 0


def record_task(record: dict[str, Any]) -> Task:
    """The task a record's run solved; records written before tasks existed are classification."""
    from clinadapt.tasks import TASKS

    return TASKS.get(record.get("task", "classification"))


def package_versions() -> dict[str, str | None]:
    return dict(_installed_versions())


@functools.cache
def _installed_versions() -> dict[str, str | None]:
    """Read once per process: package metadata costs about 10 ms a package, which a sweep of
    many short runs would otherwise pay on every record."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def hardware() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def peak_memory_mb() -> float:
    """Peak resident memory of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def build_record(
    kind: str,
    config: dict[str, Any],
    *,
    timings: dict[str, Any],
    peak_memory: float = 0.0,
    **blocks: Any,
) -> dict[str, Any]:
    """The one way a run record is made, for every kind of run.

    ``timings`` holds ``setup_s`` (loading data and backbone, extracting features: work that
    runs sharing ``setup_key`` share), and ``run_s`` (this run's own work). A grid's wall time is
    the sum of ``run_s`` plus each distinct setup once; no record adds the two.
    """
    if kind not in KINDS:
        raise ValueError(f"record kind must be one of {KINDS}, got {kind!r}")
    missing = {"setup_s", "run_s", "setup_key"} - timings.keys()
    if missing:
        raise ValueError(f"record timings lack {sorted(missing)}")
    return {
        "record_version": RECORD_VERSION,
        "kind": kind,
        "config": config,
        **blocks,
        "timings": timings,
        "peak_memory_mb": max(peak_memory, peak_memory_mb()),
        "packages": package_versions(),
        "hardware": hardware(),
    }


def failure_record(kind: str, config: dict[str, Any], err: BaseException) -> dict[str, Any]:
    """What a failed run leaves: its configuration and the error, so reports say what failed and
    a rerun retries it."""
    return {
        "record_version": RECORD_VERSION,
        "kind": kind,
        "config": config,
        "failed": True,
        "error": f"{type(err).__name__}: {err}",
    }


def _json_safe(value: Any) -> Any:
    """NaN and infinity become null so that records stay valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:  # numpy scalars
        return _json_safe(value.item())
    return value


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write via a temporary file and rename, so an interrupted run never leaves half a record.

    Only the main process writes when several processes run one training job.
    """
    if not is_main_process():
        return
    text = json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """``data`` written to a temporary file beside ``path`` and renamed onto it, with the mode a
    new file gets: readers see the old file or the whole new one, and a failure leaves neither
    a partial file nor the temporary one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        share_like_new_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def check_writable(path: str | Path, kind: str, *, folder: bool = False) -> Path:
    """Fail before any work when ``path`` (a file, or a folder with ``folder``) cannot be
    written: a file where a folder must be, or a folder without write permission. ``kind`` names
    it in the message (e.g. "record file"). Creates nothing."""
    path = Path(path)
    problem = f"cannot write the {kind} {path}"
    if path.exists():
        if path.is_dir() != folder:
            what = "a folder, not a file" if path.is_dir() else "a file, not a folder"
            raise ConfigError(f"{problem}: {path} is {what}")
        if not os.access(path, os.W_OK | (os.X_OK if folder else 0)):
            raise ConfigError(f"{problem}: {path} is not writable")
        return path
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{problem}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{problem}: {parent} is not writable")
    return path


def read_records(directory: str | Path) -> list[dict[str, Any]]:
    """All complete run records under ``directory`` (skipping unreadable or foreign JSON files,
    and pretraining and alignment records, which describe a backbone rather than an adapted
    model)."""
    records, older = [], 0
    for path in sorted(Path(directory).rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or "record_version" not in data:
            continue
        if data["record_version"] != RECORD_VERSION:
            older += 1
        elif data.get("kind") not in DESCRIBE_BACKBONES:
            data["_path"] = str(path)
            records.append(data)
    if older:
        log.warning(
            "%d records under %s are from another clinadapt record version and are left out; "
            "rerun those experiments to include them",
            older,
            directory,
        )
    return records
