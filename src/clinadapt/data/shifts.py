"""Shifted test sets: a trained dataset's test split as another scanner, protocol or resolution
would give it. A shift spec names one test set:

- ``none``: the test split itself;
- ``medmnistc:<corruption>:<severity>``: MedMNIST-C's corruption of the test split (see
  ``available_corruptions``) at severity 1-5, at the size the run reads; ``all`` for every
  corruption and ``lo-hi`` for a range of severities make one set of all of them, corruption
  by corruption in MedMNIST-C's order, severities ascending (``expand_shifts`` lists the single
  sets instead, for a grid);
- ``size:<n>``: the test split of the dataset's size-``n`` release (a resolution shift), brought
  to the model's input by the run's recorded preprocessing;
- ``target:<path>``: the user's own image folder or CSV manifest, labelled like the dataset.

A shifted set is fixed by the data seed (0 unless given), like MedMNIST-C's released sets, so runs
with different training seeds are tested on the same images. Corrupted sets are cached under
``$CLINADAPT_CACHE/shifts``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from clinadapt.data.dataset import Dataset, Split
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError
from clinadapt.paths import cache_home
from clinadapt.registry import did_you_mean

KINDS = ("none", "medmnistc", "size", "target")
GRAMMAR = (
    "none, medmnistc:<corruption or all>:<severity 1-5 or lo-hi>, size:<image size> or "
    "target:<folder or .csv manifest>"
)
CORRUPTION_VERSION = 1  # bump when corrupting changes in a way the cache key does not capture


@dataclass(frozen=True)
class ShiftSpec:
    """A parsed shift: ``kind`` and its argument (``corruption`` and ``severities`` for
    medmnistc, ``size``, or ``path``)."""

    kind: str
    corruption: str = ""
    severities: tuple[int, ...] = ()
    size: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "medmnistc":
            lo, hi = self.severities[0], self.severities[-1]
            return f"medmnistc:{self.corruption}:{lo if lo == hi else f'{lo}-{hi}'}"
        if self.kind == "size":
            return f"size:{self.size}"
        if self.kind == "target":
            return f"target:{self.path}"
        return "none"


@dataclass
class ShiftedSplit(Split):
    """A test split with the record of how it was made (``provenance``: the canonical spec,
    kind, seed and what identifies the images)."""

    provenance: dict[str, Any] = field(default_factory=dict)


def parse_shift(spec: str | None) -> ShiftSpec:
    """The spec checked for its grammar (names are checked against the dataset later); a
    target path is made absolute, so the same folder is the same shift from anywhere."""
    text = "none" if spec is None else str(spec).strip()
    kind, _, rest = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise ConfigError(
            f"shift {text!r}: {kind!r} is not a kind of shift; give {GRAMMAR}."
            f"{did_you_mean(kind, list(KINDS))}"
        )
    if kind == "none":
        if rest:
            raise ConfigError(f"shift {text!r}: 'none' takes no argument")
        return ShiftSpec("none")
    if not rest.strip():
        raise ConfigError(f"shift {text!r}: {kind} needs an argument; give {GRAMMAR}")
    if kind == "target":
        return ShiftSpec("target", path=str(Path(rest.strip()).expanduser().resolve()))
    if kind == "size":
        return ShiftSpec("size", size=_positive(rest, text, "the image size"))
    corruption, sep, severity = rest.partition(":")
    if not sep or not corruption.strip():
        raise ConfigError(
            f"shift {text!r}: write medmnistc:<corruption or all>:<severity 1-5 or lo-hi>, "
            "e.g. medmnistc:gaussian_noise:3 or medmnistc:all:1-5"
        )
    return ShiftSpec(
        "medmnistc", corruption=corruption.strip().lower(), severities=_severities(severity, text)
    )


def canonical_shift(spec: str | None) -> str:
    """The one spelling of a shift, for run identity and records."""
    return str(parse_shift(spec))


def expand_shifts(dataset: str, spec: str, *, size: int = 28) -> list[str]:
    """The single test sets a spec covers, for a grid of runs: a medmnistc spec with ``all``
    or a severity range becomes one spec per (corruption, severity) that runs at ``size``;
    any other spec is itself."""
    parsed = parse_shift(spec)
    if parsed.kind != "medmnistc":
        return [str(parsed)]
    cells, _ = _cells(parsed, dataset, size)
    return [f"medmnistc:{name}:{severity}" for name, severity in cells]


def shifted_test_split(
    dataset: Dataset, shift: str, *, seed: int = 0, cache_dir: str | Path | None = None
) -> ShiftedSplit:
    """The test split of ``dataset`` under ``shift`` (see the module docstring); corrupted
    sets are cached in ``cache_dir`` (default ``$CLINADAPT_CACHE/shifts``)."""
    parsed = parse_shift(shift)
    info = dataset.info
    if info.task is TaskType.SEGMENTATION and parsed.kind != "none":
        raise ConfigError(
            f"shift {shift!r}: shifted test sets are for classification; {info.name} is a "
            "segmentation dataset"
        )
    base = {"spec": str(parsed), "kind": parsed.kind}
    if parsed.kind == "none":
        test = dataset["test"]
        return ShiftedSplit(test.images, test.labels, test.meta, provenance=base)
    if parsed.kind == "size":
        split, extra = _size_shift(dataset, parsed.size)
    elif parsed.kind == "target":
        from clinadapt.data.target import load_target

        split, extra = load_target(Path(parsed.path), dataset)
    else:
        root = Path(cache_dir) if cache_dir is not None else cache_home() / "shifts"
        split, extra = _corrupted(dataset, parsed, seed, root)
    return ShiftedSplit(split.images, split.labels, provenance={**base, **extra})


def apply_shift(
    dataset: Dataset, shift: str, *, seed: int = 0, cache_dir: str | Path | None = None
) -> Dataset:
    """``dataset`` with its test split shifted and the shift recorded in its provenance
    (``provenance["shift"]``, also for ``none``); the other splits are untouched."""
    test = shifted_test_split(dataset, shift, seed=seed, cache_dir=cache_dir)
    shifted = test.provenance["kind"] != "none"
    splits = {**dataset.splits, "test": test} if shifted else dataset.splits
    provenance = {**dataset.provenance, "shift": test.provenance}
    return replace(dataset, splits=splits, provenance=provenance)


def _positive(text: str, spec: str, what: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"shift {spec!r}: {what} must be a positive integer, got {text!r}")
    return value


def _severities(text: str, spec: str) -> tuple[int, ...]:
    """``3`` or ``1-5`` as a tuple of severities in 1-5."""
    lo, dash, hi = text.strip().partition("-")
    try:
        first, last = int(lo), int(hi if dash else lo)
    except ValueError:
        first = last = 0
    if not 1 <= first <= last <= 5:
        raise ConfigError(
            f"shift {spec!r}: the severity must be 1-5 (MedMNIST-C's five levels) or a range "
            f"such as 1-5, got {text.strip()!r}"
        )
    return tuple(range(first, last + 1))


def _cells(
    parsed: ShiftSpec, dataset: str, size: int
) -> tuple[list[tuple[str, int]], dict[str, list[int]]]:
    """((corruption, severity) sets to build, {corruption: severities left out at ``size``}).
    A named corruption must run at every asked severity; ``all`` leaves out what cannot."""
    from clinadapt.data.corruptions import available_corruptions, corruptions_for

    table = corruptions_for(dataset)
    runnable = available_corruptions(dataset, size)
    if parsed.corruption != "all" and parsed.corruption not in table:
        raise ConfigError(
            f"shift {parsed}: MedMNIST-C has no corruption {parsed.corruption!r} for {dataset}; "
            f"it has {', '.join(table)} (or all).{did_you_mean(parsed.corruption, list(table))}"
        )
    names = list(table) if parsed.corruption == "all" else [parsed.corruption]
    cells, left_out = [], {}
    for name in names:
        missing = [s for s in parsed.severities if s not in runnable[name]]
        if missing and parsed.corruption != "all":
            need = table[name].min_size[missing[0] - 1]
            raise ConfigError(
                f"shift {parsed}: {name} at severity {missing[0]} places marks sized for "
                f"MedMNIST-C's 224 px images and needs images of at least {need} px; this run "
                f"reads {size} px. Use a larger size or severities {list(runnable[name])}"
            )
        if missing:
            left_out[name] = missing
        cells += [(name, s) for s in parsed.severities if s in runnable[name]]
    return cells, left_out


def _corrupted(
    dataset: Dataset, parsed: ShiftSpec, seed: int, root: Path
) -> tuple[Split, dict[str, Any]]:
    from clinadapt.data.array_cache import ArrayCache, array_sha256
    from clinadapt.data.corruptions import (
        cell_seed,
        corrupt,
        corruptions_for,
        medmnistc_version,
    )

    info, test = dataset.info, dataset["test"]
    if info.ndim != 2:
        raise ConfigError(
            f"shift {parsed}: MedMNIST-C corrupts 2D images; {info.name} holds volumes"
        )
    cells, left_out = _cells(parsed, info.name, int(dataset.size or 0))
    table = corruptions_for(info.name)
    clean = dataset.provenance.get("md5") or array_sha256(np.asarray(test.images))
    cache, version = ArrayCache(root), medmnistc_version()
    arrays, blocks, start = [], [], 0
    for name, severity in cells:
        corruption = table[name]
        parts = {
            "version": CORRUPTION_VERSION,
            "dataset": info.name,
            "clean_test": clean,
            "n": len(test),
            "size": dataset.size,
            "corruption": name,
            "severity": severity,
            "params": repr(corruption.params[severity - 1]),
            "seed": seed,
            "medmnistc": version,
        }
        array, digest, _ = cache.get_or_compute(
            parts,
            lambda c=corruption, s=severity, n=name: corrupt(
                np.asarray(test.images), c, s, seed=cell_seed(seed, info.name, n, s)
            ),
        )
        arrays.append(array)
        stop = start + len(array)
        blocks.append(
            {
                "corruption": name,
                "severity": severity,
                "start": start,
                "stop": stop,
                "sha256": digest,
            }
        )
        start = stop
    labels = np.concatenate([np.asarray(test.labels)] * len(arrays))
    images = arrays[0] if len(arrays) == 1 else Concatenated(arrays)
    provenance = {
        "seed": seed,
        "medmnistc": version,
        "size": dataset.size,
        "blocks": blocks,
        "left_out": left_out,
    }
    return Split(images, labels), provenance


def _size_shift(dataset: Dataset, size: int) -> tuple[Split, dict[str, Any]]:
    from clinadapt.data.medmnist import load_medmnist

    info = dataset.info
    source = Path(str(dataset.provenance.get("source", "")))
    if source.suffix != ".npz":
        raise ConfigError(
            f"shift size:{size}: a resolution shift reads another size of a MedMNIST release; "
            f"{info.name} comes from {source} (released only at size {dataset.size})"
        )
    if size == dataset.size:
        raise ConfigError(
            f"shift size:{size}: the run already reads {info.name} at size {size}; that is the "
            f"clean test set (shift=none). Released sizes: {list(info.sizes)}"
        )
    other = load_medmnist(info, source.parent, size)
    keep = ("source", "md5", "expected_md5", "verified")
    provenance = {
        "size": size,
        "run_size": dataset.size,
        **{k: other.provenance[k] for k in keep},
    }
    return other["test"], provenance


class Concatenated:
    """Image sources one after another, read on access (an ``ImageSource``)."""

    def __init__(self, parts: list[Any]) -> None:
        self.parts = parts
        self.starts = np.cumsum([0, *(len(p) for p in parts)])

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self), *self.parts[0].shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.parts[0].dtype

    def __getitem__(self, index: Any) -> np.ndarray:
        rows = np.arange(len(self))[index]
        if np.ndim(rows) == 0:
            block = int(np.searchsorted(self.starts, rows, side="right")) - 1
            return np.asarray(self.parts[block][rows - self.starts[block]])
        blocks = np.searchsorted(self.starts, rows, side="right") - 1
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        for block in np.unique(blocks):
            mask = blocks == block
            out[mask] = self.parts[block][rows[mask] - self.starts[block]]
        return out
