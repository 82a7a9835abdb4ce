"""``clinadapt predict``: class probabilities of a trained classification run for new images or
volumes, or the masks of a segmentation run at each input's own size."""

from __future__ import annotations

import csv
import io
import json
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.errors import ClinadaptError, ConfigError, DataError

MASKS_CSV = "masks.csv"


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


def run_task(run_dir: str | Path) -> str:
    """The task of a run from its record alone, so a command can check its output before loading
    the model; "classification" without a readable record (``load_run`` then says what is wrong)."""
    try:
        record = json.loads((Path(run_dir) / "record.json").read_text())
    except (OSError, ValueError):
        return "classification"
    return record.get("task", "classification") if isinstance(record, dict) else "classification"


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


@dataclass(frozen=True)
class TestTimeAdaptation:
    """How ``predict_files`` adapts the run's model to the inputs (``clinadapt.tta``): method
    ``name`` with ``options``, ``mode``, ``batch_size`` inputs per batch, under ``seed``."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    mode: str = "episodic"
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"the tta batch size must be at least 1, got {self.batch_size}")


def predict_files(
    run_dir: str | Path,
    inputs: list[str],
    out_csv: str | Path,
    *,
    batch_size: int = 32,
    progress: bool = True,
    tta: TestTimeAdaptation | None = None,
) -> Path:
    """Write ``source, p_<label>..., predicted`` rows, one per input image or volume. With
    ``tta``, a copy of the run's model adapts to the inputs, in their order, while predicting
    them (single-label classification runs; the run's files are only read)."""
    from tqdm.auto import tqdm

    from clinadapt.data.info import TaskType
    from clinadapt.data.transforms import slices_volumes

    record, model, _, preprocess = load_run(run_dir)
    task = TaskType(record["dataset"]["task"])
    slice_volumes = slices_volumes(record["dataset"]["ndim"], preprocess)
    labels = record["dataset"]["labels"]
    multilabel = record["dataset"]["task"] == "multi-label"
    if tta is not None:
        _check_tta(run_dir, task, model, slice_volumes, tta)
    size = record["preprocessing"].get("source_size") or preprocess.input_size
    channels = 3 if record["dataset"].get("channels", 1) == 3 else 1
    items = iter_inputs(inputs, size=size, channels=channels, ndim=record["dataset"]["ndim"])
    if tta is None:
        rows = _plain(model, items, task, preprocess, slice_volumes, batch_size)
    else:
        rows = _adapted(model, items, preprocess, slice_volumes, batch_size, tta)
    out = Path(out_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with tmp.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["source", *(f"p_{name}" for name in labels), "predicted"])
            bar = tqdm(desc="predict", unit="img", disable=not progress)
            for names, probs in rows:
                for name, p in zip(names, probs, strict=True):
                    predicted = (
                        "|".join(labels[i] for i in np.flatnonzero(p >= 0.5))
                        if multilabel
                        else labels[int(p.argmax())]
                    )
                    writer.writerow([name, *(f"{v:.6f}" for v in p), predicted])
                bar.update(len(names))
            bar.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)  # after any failure, no half-written file is left behind
    return out


def _plain(
    model: Any,
    items: Iterator[tuple[str, np.ndarray]],
    task: Any,
    preprocess: Any,
    slices: bool,
    batch_size: int,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(names, probabilities) of the run's model, batch by batch."""
    from clinadapt.engine.predict import predict_proba

    for batch in _batches(items, batch_size):
        names, images = zip(*batch, strict=True)
        probs = predict_proba(
            model,
            np.stack(images),
            task=task,
            preprocess=preprocess,
            batch_size=batch_size,
            volume=slices,
            progress=False,
        )
        yield list(names), probs


def _check_tta(
    run_dir: str | Path, task: Any, model: Any, slices: bool, tta: TestTimeAdaptation
) -> None:
    """Refuse what test-time adaptation cannot do, before reading any input."""
    from clinadapt.runner.tta import trained_model
    from clinadapt.tta import create_tta

    if not task.single_label:
        raise ConfigError(
            f"--tta {tta.name}: test-time adaptation methods adapt a softmax over classes, and "
            f"{run_dir} is a multi-label run (one sigmoid per label)"
        )
    create_tta(tta.name, tta.options).check(trained_model(model, slices))


def _adapted(
    model: Any,
    items: Iterator[tuple[str, np.ndarray]],
    preprocess: Any,
    slices: bool,
    read_size: int,
    tta: TestTimeAdaptation,
) -> Iterator[tuple[list[str], np.ndarray]]:
    """(names, probabilities) of all inputs, adapted with ``tta``: inputs are read and
    preprocessed ``read_size`` at a time (equal shapes stacked), then adapted on in batches of
    ``tta.batch_size``; the probabilities come once the whole stream is done."""
    import torch

    from clinadapt.runner.tta import adapt, image_batches, trained_model

    names: list[str] = []

    def preprocessed() -> Iterator[torch.Tensor]:
        for batch in _batches(items, read_size):
            names.extend(name for name, _ in batch)
            stacked = np.stack([image for _, image in batch])
            yield from image_batches(
                stacked, preprocess, len(stacked), volume_mode="axial" if slices else None
            )

    def rebatched() -> Iterator[torch.Tensor]:
        held: list[torch.Tensor] = []
        count = 0
        for x in preprocessed():
            held.append(x)
            count += len(x)
            while count >= tta.batch_size:
                joined = torch.cat(held)
                yield joined[: tta.batch_size]
                held, count = [joined[tta.batch_size :]], count - tta.batch_size
        if count:
            yield torch.cat(held)

    probs, _ = adapt(
        trained_model(model, slices),
        rebatched(),
        name=tta.name,
        options=tta.options,
        mode=tta.mode,
        batch_size=tta.batch_size,
        seed=tta.seed,
        inputs="images",
    )
    yield names, probs


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


def predict_masks_files(
    run_dir: str | Path,
    inputs: list[str],
    out_dir: str | Path,
    *,
    batch_size: int = 16,
    progress: bool = True,
) -> Path:
    """Segment every input of a segmentation run into ``out_dir`` and return its ``masks.csv``.

    2D runs take image files, 3D runs NIfTI volumes (or folders of them); each is read at its own
    size as in training and its mask written beside the others, named after the input: a PNG, or
    a NIfTI on the input's voxel grid with its affine. ``masks.csv`` lists ``source, mask`` and
    per class the foreground fraction (2D) or voxel count and volume in mm^3 (3D). Masks are
    written one by one; the CSV only once every input succeeded.
    """
    from tqdm.auto import tqdm

    from clinadapt.engine.predict import predict_masks
    from clinadapt.runner.masks import SUFFIXES, write_mask
    from clinadapt.runner.records import write_bytes_atomic

    record, model, _, preprocess = load_run(run_dir)
    task = record.get("task", "classification")
    if task != "segmentation":
        raise ConfigError(
            f"{run_dir} is a {task} run: it predicts class probabilities, written to a CSV file "
            "(predict_files), not masks"
        )
    dataset = record["dataset"]
    ndim, labels = dataset["ndim"], list(dataset["labels"])
    num_classes = int(dataset.get("num_classes", len(labels)))
    channels = 3 if dataset.get("channels", 1) == 3 else 1
    slices = bool(record["preprocessing"].get("slices"))
    out = Path(out_dir)
    cases = [
        (source, out / f"{name}{SUFFIXES[ndim]}") for source, name in mask_inputs(inputs, ndim)
    ]
    sources = {source.resolve(): source for source, _ in cases}
    clash = next((sources[t.resolve()] for _, t in cases if t.resolve() in sources), None)
    if clash is not None:
        raise ConfigError(
            f"the masks would overwrite the input {clash}: give an --out folder apart from the "
            "inputs"
        )
    rows = []
    for i, (source, target) in enumerate(
        tqdm(cases, desc="predict", unit="case", disable=not progress)
    ):
        try:
            image, affine, zooms = _read_case(source, ndim, channels)
            [mask] = predict_masks(
                model,
                [image],
                preprocess=preprocess,
                batch_size=batch_size,
                slices=slices,
                progress=False,
            )
            path = write_mask(mask, target, num_classes=num_classes, affine=affine)
        except ClinadaptError as err:
            kept = f" (the {i} masks before it are in {out})" if i else ""
            raise type(err)(
                f"{err}\nstopped at {source}{kept}; {MASKS_CSV} is written once every input "
                f"succeeds: fix or remove {source} and run again"
            ) from None
        rows.append(
            [str(source), path.relative_to(out).as_posix(), *_sizes(mask, num_classes, zooms)]
        )
    header = ["source", "mask"]
    for label in labels[1:]:
        header += [f"fraction_{label}"] if ndim == 2 else [f"voxels_{label}", f"volume_mm3_{label}"]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *rows])
    csv_path = out / MASKS_CSV
    write_bytes_atomic(csv_path, text.getvalue().encode())
    return csv_path


def mask_inputs(inputs: list[str], ndim: int) -> list[tuple[Path, Path]]:
    """(file, mask name without suffix) of every input, all checked before any is read: image
    files for 2D runs, NIfTI volumes for 3D runs. A file found in a folder keeps its sub-folder
    in the name, so equal file names in different sub-folders do not overwrite each other."""
    from clinadapt.data.lazy import IMAGE_SUFFIXES
    from clinadapt.data.volumes import VOLUME_SUFFIXES

    found: list[tuple[Path, Path]] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        if not path.is_dir():
            found.append((path, Path(_stem(path))))
            continue
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and not p.name.startswith(".")
            and p.name.lower().endswith(IMAGE_SUFFIXES + VOLUME_SUFFIXES)
        )
        if not files:
            raise DataError(f"folder {path} holds no image or volume files")
        found += [(p, p.relative_to(path).parent / _stem(p)) for p in files]
    seen: dict[str, Path] = {}
    for path, name in found:
        _check_dimensions(path, ndim)
        other = seen.setdefault(name.as_posix().lower(), path)
        if other != path:
            raise DataError(
                f"{other} and {path} would both be written as the mask {name}: predict them into "
                "separate --out folders, or rename one"
            )
    return found


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _check_dimensions(path: Path, ndim: int) -> None:
    from clinadapt.data.lazy import IMAGE_SUFFIXES
    from clinadapt.data.volumes import VOLUME_SUFFIXES

    name = path.name.lower()
    if ndim == 2 and name.endswith(VOLUME_SUFFIXES):
        raise DataError(
            f"{path} is a volume but this run segments 2D images; give image files "
            f"({', '.join(IMAGE_SUFFIXES)}) or use a run trained on volumes"
        )
    if ndim == 3 and name.endswith(IMAGE_SUFFIXES):
        raise DataError(
            f"{path} is a 2D image but this run segments volumes; give NIfTI files (.nii, "
            ".nii.gz) or use a run trained on 2D images"
        )
    if ndim == 3 and name.endswith(".dcm"):
        raise DataError(
            f"{path}: DICOM is not segmented directly, because a mask needs the voxel grid of "
            "a NIfTI file; convert the series to NIfTI (e.g. with dcm2niix) and predict that"
        )
    if not name.endswith((*IMAGE_SUFFIXES, ".nii", ".nii.gz")):
        what = "image files" if ndim == 2 else "NIfTI volumes"
        raise DataError(f"cannot read {path}: a segmentation run takes {what} or folders of them")


def _read_case(
    path: Path, ndim: int, channels: int
) -> tuple[np.ndarray, np.ndarray | None, tuple[float, ...] | None]:
    """(image, affine, voxel size in mm) as training read it, at the case's own size."""
    from clinadapt.data import seg_files
    from clinadapt.data.lazy import decode_image

    if ndim == 2:
        return decode_image(path, channels=channels), None, None
    header = seg_files.nifti_header(path)
    return seg_files.read_nifti_image(path), header["affine"], header["zooms"]


def _sizes(mask: np.ndarray, num_classes: int, zooms: tuple[float, ...] | None) -> list[str]:
    """Per foreground class: the fraction of pixels (2D), or voxels and mm^3 (3D)."""
    counts = np.bincount(mask.ravel(), minlength=num_classes)[1:num_classes]
    if zooms is None:
        return [f"{n / mask.size:.6f}" for n in counts]
    voxel = float(np.prod(zooms))
    return [value for n in counts for value in (str(int(n)), f"{n * voxel:.3f}")]
