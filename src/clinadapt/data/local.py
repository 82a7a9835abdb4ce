"""The user's own data: an image folder (one sub-folder per class), a CSV manifest, or, for
self-supervised pretraining, a flat folder of unlabelled images or volumes.

Files are checked to exist up front and read lazily; images are resized to ``image_size`` and
volumes to a ``volume_size`` cube on read. Without given splits, a seeded stratified 70/10/20
split is made, grouped by patient when the manifest has a ``patient_id`` column.
"""

from __future__ import annotations

import csv
import hashlib
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.data.dataset import SPLITS, Dataset, Split
from clinadapt.data.info import DatasetInfo, TaskType
from clinadapt.data.lazy import IMAGE_SUFFIXES, LazySource, infer_channels, load_image
from clinadapt.data.lazy import INTENSITY as IMAGE_INTENSITY
from clinadapt.data.splits import assign_splits
from clinadapt.data.volumes import INTENSITY as VOLUME_INTENSITY
from clinadapt.data.volumes import VOLUME_SUFFIXES, is_volume, read_volume
from clinadapt.errors import DataError
from clinadapt.registry import did_you_mean


def load_image_folder(
    folder: Path, *, image_size: int = 224, volume_size: int = 64, seed: int = 0
) -> Dataset:
    """``folder/<class>/...`` or ``folder/{train,val,test}/<class>/...`` (val optional)."""
    subdirs = {p.name.lower(): p for p in _subdirs(folder)}
    given = {"train", "test"} <= set(subdirs) and set(subdirs) <= set(SPLITS)
    layout = {s: subdirs[s] for s in SPLITS if s in subdirs} if given else {"": folder}
    paths: list[Path] = []
    tokens: list[list[str]] = []
    splits: list[str] = []
    for split, root in layout.items():
        for class_dir in _subdirs(root):
            files = sorted(p for p in class_dir.rglob("*") if _usable(p, class_dir))
            if not files:
                raise DataError(
                    f"{class_dir} holds no images or volumes "
                    f"({', '.join(IMAGE_SUFFIXES + VOLUME_SUFFIXES)}); remove the empty class"
                )
            paths += files
            tokens += [[class_dir.name]] * len(files)
            splits += [split] * len(files)
    if not paths:
        raise DataError(
            f"{folder} has no class sub-folders; expected {folder}/<class name>/<images>"
        )
    return _build(
        folder.name,
        folder,
        paths,
        tokens,
        splits if given else None,
        None,
        str(folder),
        multi=False,
        image_size=image_size,
        volume_size=volume_size,
        seed=seed,
    )


def load_manifest(
    csv_path: Path, *, image_size: int = 224, volume_size: int = 64, seed: int = 0
) -> Dataset:
    """A CSV with columns ``path,label[,split][,patient_id][,domain]``; paths relative to the
    CSV.

    ``label`` is a class name or integer; ``a|b`` makes the dataset multi-label. ``domain`` names
    the source of each image (hospital, scanner, modality) for methods that use it (``dapl``).
    """
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            numbered = [
                (reader.line_num, {k.strip().lower(): (v or "").strip() for k, v in r.items() if k})
                for r in reader
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{csv_path}: cannot read this CSV manifest ({err})") from None
    rows = [row for _, row in numbered]
    columns = set(rows[0]) if rows else set()
    if not {"path", "label"} <= columns:
        raise DataError(
            f"{csv_path} needs a header with columns path,label (optional: split, patient_id, "
            "domain); "
            f"found {sorted(columns) or 'no rows'}"
        )
    multi = any("|" in r["label"] for r in rows)
    paths, tokens, splits, groups, domains = [], [], [], [], []
    for line, row in numbered:
        where = f"{csv_path}, line {line}"
        path = csv_path.parent / row["path"]
        if not row["path"]:
            raise DataError(f"{where}: the path is empty; fill it in every row")
        if not path.exists():
            raise DataError(f"{where}: {path} does not exist")
        names = [t.strip() for t in row["label"].split("|") if t.strip()]
        if not names and not multi:
            raise DataError(f"{where}: the label is empty")
        for column, out in (("split", splits), ("patient_id", groups), ("domain", domains)):
            if column in columns:
                value = row[column].lower() if column == "split" else row[column]
                if not value:
                    raise DataError(f"{where}: {column} is empty; fill it in every row")
                if column == "split" and value not in SPLITS:
                    raise DataError(
                        f"{where}: split {value!r} is not one of {list(SPLITS)}."
                        f"{did_you_mean(value, list(SPLITS))}"
                    )
                out.append(value)
        paths.append(path)
        tokens.append(names)
    return _build(
        csv_path.stem,
        csv_path,
        paths,
        tokens,
        splits or None,
        np.asarray(groups) if groups else None,
        str(csv_path),
        domains=np.asarray(domains) if domains else None,
        multi=multi,
        image_size=image_size,
        volume_size=volume_size,
        seed=seed,
    )


def load_unlabelled_folder(
    folder: Path, *, image_size: int = 224, volume_size: int = 64
) -> Dataset:
    """Every image or volume under ``folder`` as one ``train`` split with placeholder labels:
    pretraining ignores labels, so scans need no sorting into classes."""
    paths = sorted(p for p in folder.rglob("*") if _usable(p, folder))
    if not paths:
        raise DataError(
            f"{folder} holds no images or volumes ({', '.join(IMAGE_SUFFIXES + VOLUME_SUFFIXES)})"
        )
    size, channels, ndim, loader, item_shape, dtype = _reader(
        paths, str(folder), image_size, volume_size
    )
    info = DatasetInfo(
        name=folder.name.lower(),
        task=TaskType.MULTICLASS,
        labels=("unlabelled",),
        channels=channels,
        ndim=ndim,
        splits={"train": len(paths)},
        sizes=(size,),
        description=f"unlabelled local data from {folder}",
    )
    labels = np.zeros((len(paths), 1), dtype=np.int64)
    idx = {"train": np.arange(len(paths))}
    split = Split(LazySource(paths, loader, item_shape, dtype), labels)
    provenance = {
        "source": str(folder),
        "md5": _fingerprint(folder, paths, labels, idx),
        "md5_of": "path, bytes and mtime of every file",
        "expected_md5": None,
        "verified": None,
        "size": size,
        "intensity": VOLUME_INTENSITY if ndim == 3 else IMAGE_INTENSITY,
    }
    return Dataset(info=info, splits={"train": split}, size=size, provenance=provenance)


def _reader(
    paths: list[Path], where: str, image_size: int, volume_size: int
) -> tuple[int, int, int, Any, tuple[int, ...], type]:
    """(size, channels, ndim, loader, item shape, dtype) for files of one kind."""
    kinds = [is_volume(p) for p in paths]
    if any(kinds) and not all(kinds):
        raise DataError(
            f"{where} mixes 2D images ({paths[kinds.index(False)]}) and 3D volumes "
            f"({paths[kinds.index(True)]}); use one kind per dataset"
        )
    if all(kinds):
        size = volume_size
        return size, 1, 3, partial(read_volume, size=size), (size, size, size), np.float32
    size, channels = image_size, infer_channels(paths)
    shape = (size, size) if channels == 1 else (size, size, 3)
    return size, channels, 2, partial(load_image, size=size, channels=channels), shape, np.uint8


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _usable(path: Path, root: Path) -> bool:
    hidden = any(part.startswith(".") for part in path.relative_to(root).parts)
    name = path.name.lower()
    return path.is_file() and not hidden and name.endswith(IMAGE_SUFFIXES + VOLUME_SUFFIXES)


def _encode(
    tokens: list[list[str]], multi: bool, where: str
) -> tuple[tuple[str, ...], np.ndarray, TaskType]:
    """Class names in index order and the label array; integer labels keep their numbers."""
    values = sorted({t for ts in tokens for t in ts})
    if values and all(v.isdigit() for v in values):
        present = {int(v) for v in values}
        names = [str(i) for i in range(max(present) + 1)]
        missing = sorted(set(range(len(names))) - present)
        if missing:
            raise DataError(
                f"{where}: integer labels run 0..{len(names) - 1} but classes {missing} have "
                "no examples; renumber the classes or use class names"
            )
        index = {v: int(v) for v in values}
    else:
        names = values
        index = {v: i for i, v in enumerate(values)}
    if len(names) < 2:
        raise DataError(f"{where}: found only the classes {names}; at least 2 are needed")
    if multi:
        labels = np.zeros((len(tokens), len(names)), dtype=np.int64)
        for row, ts in enumerate(tokens):
            labels[row, [index[t] for t in ts]] = 1
        return tuple(names), labels, TaskType.MULTILABEL
    labels = np.array([[index[ts[0]]] for ts in tokens], dtype=np.int64)
    task = TaskType.BINARY if len(names) == 2 else TaskType.MULTICLASS
    return tuple(names), labels, task


def _build(
    name: str,
    source: Path,
    paths: list[Path],
    tokens: list[list[str]],
    given: list[str] | None,
    groups: np.ndarray | None,
    where: str,
    *,
    domains: np.ndarray | None = None,
    multi: bool,
    image_size: int,
    volume_size: int,
    seed: int,
) -> Dataset:
    class_names, labels, task = _encode(tokens, multi, where)
    size, channels, ndim, loader, item_shape, dtype = _reader(paths, where, image_size, volume_size)
    idx = assign_splits(labels, given, groups, seed, where)
    _check_unique(paths, idx, given is not None, source, where)
    info = DatasetInfo(
        name=name.lower(),
        task=task,
        labels=class_names,
        channels=channels,
        ndim=ndim,
        splits={s: len(idx[s]) for s in SPLITS},
        sizes=(size,),
        description=f"local data from {source}",
    )
    splits = {
        s: Split(
            LazySource([paths[i] for i in idx[s]], loader, item_shape, dtype),
            labels[idx[s]],
            domains=None if domains is None else domains[idx[s]],
        )
        for s in SPLITS
    }
    provenance = {
        "source": str(source),
        "md5": _fingerprint(source, paths, labels, idx, domains),
        "md5_of": "split, path, bytes, mtime and label of every file",
        "expected_md5": None,
        "verified": None,
        "size": size,
        "intensity": VOLUME_INTENSITY if ndim == 3 else IMAGE_INTENSITY,
        "split_seed": seed,
        "splits_given": given is not None,
    }
    return Dataset(info=info, splits=splits, size=size, provenance=provenance)


def _check_unique(
    paths: list[Path], idx: dict[str, np.ndarray], given: bool, source: Path, where: str
) -> None:
    """One file in two splits inflates test results. Refuse given splits that do that, and any
    repeated file when the split is automatic (its copies could land in train and test)."""
    splits_of: dict[Path, list[str]] = {}
    for split, rows in idx.items():
        for i in rows:
            splits_of.setdefault(paths[i].resolve(), []).append(split)
    base = (source if source.is_dir() else source.parent).resolve()
    shown = {
        (p.relative_to(base) if p.is_relative_to(base) else p): sorted(set(s), key=SPLITS.index)
        for p, s in splits_of.items()
        if (len(set(s)) if given else len(s)) > 1
    }
    if not shown:
        return
    count = f"{len(shown)} file is" if len(shown) == 1 else f"{len(shown)} files are"
    if given:
        examples = ", ".join(f"{p} ({', '.join(s)})" for p, s in list(shown.items())[:5])
        raise DataError(
            f"{where}: {count} listed in more than one split: {examples}; keep each file in one "
            "split, or the test results include training images"
        )
    examples = ", ".join(map(str, list(shown)[:5]))
    raise DataError(
        f"{where}: {count} listed more than once: {examples}; list each file once (the automatic "
        "split could put copies of a file in both train and test)"
    )


def _fingerprint(
    source: Path,
    paths: list[Path],
    labels: np.ndarray,
    idx: dict[str, np.ndarray],
    domains: np.ndarray | None = None,
) -> str:
    """Changes whenever a file, a label, a domain or the split assignment changes (keys feature
    caches)."""
    base = source if source.is_dir() else source.parent
    digest = hashlib.md5(usedforsecurity=False)
    for split, rows in idx.items():
        for i in rows:
            st = paths[i].stat()
            rel = paths[i].relative_to(base) if paths[i].is_relative_to(base) else paths[i]
            line = f"{split}\t{rel}\t{st.st_size}\t{st.st_mtime_ns}\t{labels[i].tolist()}"
            line += "\n" if domains is None else f"\t{domains[i]}\n"
            digest.update(line.encode())
    return digest.hexdigest()
