"""Segmentation datasets in three folder layouts, read lazily at each case's own size:

- image/mask pairs: ``images/`` and ``masks/`` with the same file stems (Kvasir-SEG);
- DSB2018: ``stage1_train/<id>/images/<id>.png`` and one PNG per instance in ``<id>/masks/``;
- MSD: ``imagesTr/`` and ``labelsTr/`` NIfTI files with the same names, optional ``dataset.json``.

Opening a dataset reads headers only (sizes, affines); pixels are read when a case is indexed.
Without a ``cases.csv`` (columns ``id`` and ``patient_id`` and/or ``split``) the cases get a
seeded 70/10/20 train/val/test split.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.data import seg_files as sf
from clinadapt.data.dataset import SPLITS, Dataset, Split
from clinadapt.data.info import DatasetInfo, TaskType
from clinadapt.data.lazy import IMAGE_SUFFIXES, CaseSource, decode_image, infer_channels
from clinadapt.data.lazy import INTENSITY as IMAGE_INTENSITY
from clinadapt.data.splits import assign_splits
from clinadapt.data.volumes import INTENSITY as VOLUME_INTENSITY
from clinadapt.errors import DataError

LABEL_SAMPLES = 16  # masks read to infer the labels when none are declared
MANIFEST = "cases.csv"


def segmentation_layout(folder: Path) -> str | None:
    """``"pairs"``, ``"dsb2018"``, ``"msd"`` or None for a folder that is none of them."""
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        return "pairs"
    if (folder / "stage1_train").is_dir():
        return "dsb2018"
    if (folder / "imagesTr").is_dir() and (folder / "labelsTr").is_dir():
        return "msd"
    return None


@dataclass
class _Cases:
    """Every case of a dataset before splitting; readers take the case's index."""

    ids: list[str]
    files: list[list[Path]]  # the files of each case (image first), for the fingerprint
    meta: list[dict[str, Any]]
    read_image: Callable[[int], np.ndarray]
    read_label: Callable[[int], np.ndarray]
    labels: tuple[str, ...]
    channels: int
    ndim: int
    mask_encoding: str
    extra: dict[str, Any] = field(default_factory=dict)


def load_segmentation(folder: Path, *, info: DatasetInfo | None = None, seed: int = 0) -> Dataset:
    """The segmentation dataset in ``folder``; ``info`` (a registered record) declares its name
    and labels, else they come from ``dataset.json`` or the masks themselves."""
    layout = segmentation_layout(folder)
    if layout is None:
        raise DataError(
            f"{folder} is not a segmentation folder: expected images/ + masks/, stage1_train/, "
            "or imagesTr/ + labelsTr/"
        )
    declared = info.labels if info is not None else sf.read_label_names(folder / "dataset.json")
    reader = {"pairs": _pairs, "dsb2018": _dsb2018, "msd": _msd}[layout]
    cases = reader(folder, declared)
    idx, how = _assign(cases.ids, folder, seed)
    meta = {
        "name": (info.name if info else folder.name).lower(),
        "task": TaskType.SEGMENTATION,
        "labels": cases.labels,
        "channels": cases.channels,
        "ndim": cases.ndim,
        "splits": {s: len(idx[s]) for s in SPLITS},
        "description": info.description if info else f"local segmentation data from {folder}",
        "license": info.license if info else "",
        "modality": (info.modality if info else "") or cases.extra.get("modality", ""),
    }
    splits = {s: _split(cases, idx[s]) for s in SPLITS}
    provenance = {
        "source": str(folder),
        "layout": layout,
        "md5": _fingerprint(folder, cases, idx),
        "md5_of": "split, path, bytes and mtime of every image and mask file",
        "expected_md5": None,
        "verified": None,
        "size": None,
        "intensity": VOLUME_INTENSITY if cases.ndim == 3 else IMAGE_INTENSITY,
        "mask_encoding": cases.mask_encoding,
        **how,
    }
    return Dataset(info=DatasetInfo(**meta), splits=splits, size=None, provenance=provenance)


def count_empty_masks(dataset: Dataset) -> dict[str, int]:
    """Cases without foreground per split, also stored as ``provenance["empty_masks"]``.
    Reads every mask once, so it is asked for rather than done on opening."""
    counts = {
        name: sum(int(not np.any(split.labels[i])) for i in range(len(split)))
        for name, split in dataset.splits.items()
    }
    dataset.provenance["empty_masks"] = counts
    return counts


def _split(cases: _Cases, rows: np.ndarray) -> Split:
    rows = [int(i) for i in rows]
    paths = [cases.files[i][0] for i in rows]
    return Split(
        images=CaseSource(paths, lambda j: cases.read_image(rows[j])),
        labels=CaseSource(paths, lambda j: cases.read_label(rows[j])),
        meta=[cases.meta[i] for i in rows],
    )


def _files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.lower().endswith(suffixes)
    )
    if not files:
        raise DataError(f"{folder} holds no {', '.join(suffixes)} files; add the cases to it")
    return files


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _sampled(n: int) -> list[int]:
    return list(range(n))[:: max(1, n // LABEL_SAMPLES)][:LABEL_SAMPLES]


def _labels_from_max(top: int, threshold: bool) -> tuple[str, ...]:
    if threshold or top <= 1:
        return ("background", "foreground")
    return ("background", *(str(k) for k in range(1, top + 1)))


def _pairs(folder: Path, declared: tuple[str, ...] | None) -> _Cases:
    images = _files(folder / "images", IMAGE_SUFFIXES)
    masks: dict[str, Path] = {}
    for mask in _files(folder / "masks", IMAGE_SUFFIXES):
        if _stem(mask) in masks:
            raise DataError(f"{mask} and {masks[_stem(mask)]} are two masks for one image")
        masks[_stem(mask)] = mask
    unmatched = sorted(set(masks) - {_stem(p) for p in images})
    if unmatched:
        raise DataError(
            f"{folder / 'masks'}: {len(unmatched)} masks have no image of the same name in "
            f"{folder / 'images'} (e.g. {masks[unmatched[0]].name}); remove them or add the images"
        )
    pairs, shapes = [], []
    for image in images:
        mask = masks.get(_stem(image))
        if mask is None:
            raise DataError(
                f"{image} has no mask: expected {folder / 'masks' / _stem(image)}.<png|jpg|...>; "
                "add it, or remove the image"
            )
        shapes.append(sf.check_same_size(image, mask))
        pairs.append((image, mask))
    top = max(int(sf.decode_mask(pairs[i][1]).max()) for i in _sampled(len(pairs)))
    threshold = top >= sf.THRESHOLD and (declared is None or len(declared) == 2)
    labels = declared or _labels_from_max(top, threshold)
    encoding = "threshold" if threshold else "index"
    channels = infer_channels(images)
    return _Cases(
        ids=[_stem(image) for image in images],
        files=[[image, mask] for image, mask in pairs],
        meta=[
            {"id": _stem(i), "source": str(i), "mask": str(m), "shape": s, "spacing": None}
            for (i, m), s in zip(pairs, shapes, strict=True)
        ],
        read_image=lambda k: decode_image(pairs[k][0], channels=channels),
        read_label=lambda k: sf.read_mask(pairs[k][1], shapes[k], encoding, len(labels)),
        labels=tuple(labels),
        channels=channels,
        ndim=2,
        mask_encoding=sf.MASK_ENCODINGS[encoding],
    )


def _dsb2018(folder: Path, declared: tuple[str, ...] | None) -> _Cases:
    root = folder / "stage1_train"
    ids = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not ids:
        raise DataError(f"{root} holds no case folders (<id>/images/<id>.png + <id>/masks/)")
    labels = declared or ("background", "nucleus")
    if len(labels) != 2:
        raise DataError(f"{folder}: DSB2018 masks are binary, but {len(labels)} labels were given")
    images, instances = [], []
    for case in ids:
        image = root / case / "images" / f"{case}.png"
        if not image.is_file():
            raise DataError(f"{root / case} has no image: expected {image}")
        if not (root / case / "masks").is_dir():
            raise DataError(f"{image} has no masks: expected the folder {root / case / 'masks'}")
        images.append(image)
        instances.append(sorted(p for p in (root / case / "masks").glob("*.png")))
    channels = infer_channels(images)
    shapes = [sf.image_size(image) for image in images]
    return _Cases(
        ids=ids,
        files=[[image, *masks] for image, masks in zip(images, instances, strict=True)],
        meta=[
            {
                "id": case,
                "source": str(image),
                "instances": [str(p) for p in masks],
                "shape": shape,
                "spacing": None,
            }
            for case, image, masks, shape in zip(ids, images, instances, shapes, strict=True)
        ],
        read_image=lambda k: decode_image(images[k], channels=channels),
        read_label=lambda k: (sf.read_instances(instances[k], shapes[k]) > 0).astype(np.uint8),
        labels=tuple(labels),
        channels=channels,
        ndim=2,
        mask_encoding="union of the instance masks (foreground where nonzero)",
    )


def _msd(folder: Path, declared: tuple[str, ...] | None) -> _Cases:
    images = _files(folder / "imagesTr", (".nii", ".nii.gz"))
    pairs, meta = [], []
    for image in images:
        stem = _stem(image)
        suffix = image.name[len(stem) :]
        candidates = [folder / "labelsTr" / n for n in (image.name, stem[:-5] + suffix)]
        if not stem.endswith("_0000"):  # nnU-Net names the first channel <case>_0000
            candidates = candidates[:1]
        label = next((p for p in candidates if p.is_file()), None)
        if label is None:
            raise DataError(f"{image} has no label: expected {folder / 'labelsTr' / image.name}")
        header = sf.check_nifti_pair(image, label)
        pairs.append((image, label))
        meta.append(
            {
                "id": stem.removesuffix("_0000"),
                "source": str(image),
                "mask": str(label),
                "shape": header["shape"][::-1],
                "spacing": header["zooms"][::-1],
                "affine": header["affine"].tolist(),
            }
        )
    if declared is None:
        top = max(int(sf.read_nifti_label(pairs[i][1], 256).max()) for i in _sampled(len(pairs)))
        declared = _labels_from_max(top, threshold=False)
    labels = tuple(declared)
    return _Cases(
        ids=[m["id"] for m in meta],
        files=[[image, label] for image, label in pairs],
        meta=meta,
        read_image=lambda k: sf.read_nifti_image(pairs[k][0]),
        read_label=lambda k: sf.read_nifti_label(pairs[k][1], len(labels)),
        labels=labels,
        channels=1,
        ndim=3,
        mask_encoding=(
            "label values are class indices; arrays are the stored voxels with the axes "
            "reversed, (D, H, W) = file (k, j, i), spacing in that order"
        ),
        extra={"modality": _modality(folder / "dataset.json")},
    )


def _modality(path: Path) -> str:
    try:
        modality = json.loads(path.read_text(encoding="utf-8")).get("modality", {})
    except (OSError, ValueError, AttributeError):
        return ""
    return ", ".join(map(str, modality.values())) if isinstance(modality, dict) else str(modality)


def _assign(ids: list[str], folder: Path, seed: int) -> tuple[dict[str, np.ndarray], dict]:
    """Split indices and how they were made, from ``cases.csv`` when the folder has one."""
    manifest = folder / MANIFEST
    groups, given = _read_manifest(manifest, ids) if manifest.is_file() else (None, None)
    unlabelled = np.zeros((len(ids), 1), dtype=np.int64)  # cases are not stratified by class
    idx = assign_splits(unlabelled, given, groups, seed, str(manifest))
    how = {
        "split_seed": seed,
        "splits_given": given is not None,
        "split_by": "case" if groups is None else "patient",
        "split_fractions": None if given is not None else "70/10/20",
    }
    return idx, how


def _read_manifest(path: Path, ids: list[str]) -> tuple[np.ndarray | None, np.ndarray | None]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [
                {k.strip().lower(): (v or "").strip() for k, v in r.items() if k}
                for r in csv.DictReader(f)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read this CSV ({err})") from None
    columns = set(rows[0]) if rows else set()
    if "id" not in columns or not columns & {"patient_id", "split"}:
        raise DataError(
            f"{path} needs the columns id and patient_id and/or split; found {sorted(columns)}"
        )
    by_id = {r["id"]: r for r in rows}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise DataError(f"{path} does not list the case {missing[0]!r} ({len(missing)} missing)")
    out = []
    for column in ("patient_id", "split"):
        if column not in columns:
            out.append(None)
            continue
        values = [by_id[i][column].lower() if column == "split" else by_id[i][column] for i in ids]
        bad = next(
            (
                i
                for i, v in zip(ids, values, strict=True)
                if not v or (column == "split" and v not in SPLITS)
            ),
            None,
        )
        if bad is not None:
            raise DataError(
                f"{path}: case {bad!r} has {column} {by_id[bad][column]!r}; fill it in "
                f"(a split is one of {list(SPLITS)})"
            )
        out.append(np.asarray(values))
    return out[0], out[1]


def _fingerprint(folder: Path, cases: _Cases, idx: dict[str, np.ndarray]) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    for split, rows in idx.items():
        for i in rows:
            for path in cases.files[i]:
                st = path.stat()
                rel = path.relative_to(folder) if path.is_relative_to(folder) else path
                digest.update(f"{split}\t{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()
