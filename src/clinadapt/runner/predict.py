"""``clinadapt predict``: class probabilities of a trained run for new images or volumes."""

from __future__ import annotations

import csv
import json
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.errors import ClinadaptError, DataError


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], Any, Any, Any]:
    """The record, adapted model, method and preprocessing of a finished training run."""
    from clinadapt.adapt.checkpoint import load_adapted
    from clinadapt.config import from_dict
    from clinadapt.runner.common import make_preprocess
    from clinadapt.runner.experiment import ExperimentConfig
    from clinadapt.tasks import TASKS

    run_dir = Path(run_dir)
    record_file = run_dir / "record.json"
    if not record_file.exists():
        raise ClinadaptError(
            f"{run_dir} is not a finished training run (no record.json); train one with "
            "`clinadapt train --out RUN_DIR ...` (frozen-feature runs keep no model)"
        )
    record = json.loads(record_file.read_text())
    cfg = from_dict(ExperimentConfig, record["config"], where=str(record_file))
    model, method = load_adapted(run_dir / "adapter", trust_pickle=cfg.trust_pickle)
    task = TASKS.get(record.get("task", "classification"))
    return record, model.eval(), method, make_preprocess(model.backbone, cfg, task)


def iter_inputs(
    inputs: list[str], *, size: int, channels: int, ndim: int
) -> Iterator[tuple[str, np.ndarray]]:
    """(name, image) for image files, folders of them, npz arrays and NIfTI/DICOM volumes.

    Images are brought to the run's source size (e.g. 28 px), as the model saw in training.
    """
    from clinadapt.data.lazy import IMAGE_SUFFIXES, load_image
    from clinadapt.data.transforms import check_pixels
    from clinadapt.data.volumes import VOLUME_SUFFIXES, read_volume

    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        if path.is_dir() and not any(path.glob("*.dcm")):
            files = sorted(
                p
                for p in path.rglob("*")
                if p.name.lower().endswith(IMAGE_SUFFIXES + VOLUME_SUFFIXES)
            )
            if not files:
                raise DataError(f"folder {path} holds no image or volume files")
            yield from iter_inputs([str(p) for p in files], size=size, channels=channels, ndim=ndim)
        elif path.name.endswith(".npz"):
            yield from _npz_items(path, ndim)
        elif path.is_dir() or path.name.lower().endswith(VOLUME_SUFFIXES):
            if ndim != 3:
                raise DataError(f"{path} is a volume but this model was trained on 2D images")
            yield str(path), read_volume(path, size=size)
        elif path.name.lower().endswith(IMAGE_SUFFIXES):
            if ndim == 3:
                raise DataError(f"{path} is a 2D image but this model was trained on volumes")
            image = load_image(path, size=size, channels=channels)
            check_pixels(image, str(path))
            yield str(path), image
        else:
            raise DataError(f"cannot read {path}: expected an image, a folder, an .npz or a volume")


def _npz_items(path: Path, ndim: int) -> Iterator[tuple[str, np.ndarray]]:
    from clinadapt.data.transforms import check_pixels

    key, images = _read_npz_images(path)
    stacked = (
        images.ndim == 4
        if ndim == 3
        else images.ndim == 3 or (images.ndim == 4 and images.shape[-1] in (1, 3))
    )
    if not stacked:
        raise DataError(
            f"{path}:{key} has shape {images.shape}, not a stack of "
            f"{'volumes (N, D, H, W)' if ndim == 3 else 'images (N, H, W) or (N, H, W, 1 or 3)'}"
        )
    check_pixels(images, f"{path}:{key}")
    for i, image in enumerate(images):
        yield f"{path}:{key}[{i}]", image


def _read_npz_images(path: Path) -> tuple[str, np.ndarray]:
    """The ``test_images`` (else ``images``) array of an npz, in native byte order."""
    unreadable = (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error)
    hint = "it is empty, truncated or corrupt, or not an npz archive; save it again"
    try:
        archive = np.load(path)
    except unreadable as err:
        raise DataError(f"{path} is not a readable npz file ({err}): {hint}") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{path} holds a single array, not an npz archive; save it with "
            "numpy.savez(path, images=...)"
        )
    with archive:
        keys = [k for k in ("test_images", "images") if k in archive.files]
        if not keys:
            raise DataError(f"{path} has no 'images' or 'test_images' array (has {archive.files})")
        try:
            images = archive[keys[0]]
        except unreadable as err:
            raise DataError(f"{path}:{keys[0]} cannot be read ({err}): {hint}") from None
    if not images.dtype.isnative:  # saved on a big-endian machine; torch needs native order
        images = images.astype(images.dtype.newbyteorder("="))
    return keys[0], images


def predict_files(
    run_dir: str | Path,
    inputs: list[str],
    out_csv: str | Path,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> Path:
    """Write ``source, p_<label>..., predicted`` rows, one per input image or volume."""
    from tqdm.auto import tqdm

    from clinadapt.data.info import TaskType
    from clinadapt.data.transforms import slices_volumes
    from clinadapt.engine.predict import predict_proba

    record, model, _, preprocess = load_run(run_dir)
    task = TaskType(record["dataset"]["task"])
    slice_volumes = slices_volumes(record["dataset"]["ndim"], preprocess)
    labels = record["dataset"]["labels"]
    multilabel = record["dataset"]["task"] == "multi-label"
    size = record["preprocessing"].get("source_size") or preprocess.input_size
    channels = 3 if record["dataset"].get("channels", 1) == 3 else 1
    items = iter_inputs(inputs, size=size, channels=channels, ndim=record["dataset"]["ndim"])
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["source", *(f"p_{name}" for name in labels), "predicted"])
            bar = tqdm(desc="predict", unit="img", disable=not progress)
            for batch in _batches(items, batch_size):
                names, images = zip(*batch, strict=True)
                probs = predict_proba(
                    model,
                    np.stack(images),
                    task=task,
                    preprocess=preprocess,
                    batch_size=batch_size,
                    volume=slice_volumes,
                    progress=False,
                )
                for name, p in zip(names, probs, strict=True):
                    predicted = (
                        "|".join(labels[i] for i in np.flatnonzero(p >= 0.5))
                        if multilabel
                        else labels[int(p.argmax())]
                    )
                    writer.writerow([name, *(f"{v:.6f}" for v in p), predicted])
                bar.update(len(batch))
            bar.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)  # after any failure, no half-written file is left behind
    return out


def _batches(items: Iterator[tuple[str, np.ndarray]], size: int) -> Iterator[list]:
    """Consecutive items of equal shape and dtype, at most ``size`` at a time: stacking uint8
    with float images would turn 0-255 values into floats read as if in [0, 1]."""
    batch: list = []
    for item in items:
        first = batch[0][1] if batch else None
        if batch and (
            len(batch) == size or first.shape != item[1].shape or first.dtype != item[1].dtype
        ):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch
