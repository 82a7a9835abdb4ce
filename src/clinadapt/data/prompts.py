"""Oracle prompts: boxes and points drawn from a ground-truth mask, standing in for the box a
clinician drags or the points they click, so that promptable models (SAM, MedSAM) can be scored
without a user. They know where every object is: scores with them are an upper bound of what a
user's prompts would give.

Pixels are addressed as ``x`` (column) and ``y`` (row). A box is ``[x0, y0, x1, y1]``, the first
and last foreground column and row (MedSAM's ``[x_min, y_min, x_max, y_max]``); an object one
pixel thin gets ``x1 = x0 + 1`` (``y1 = y0 + 1``) so that the box has an area. Jitter moves each
side outward by its own random 0..N px and clips to the image (0..W, 0..H), as MedSAM perturbs
its boxes (``bbox_shift``). Points lie on pixels: the first positive point is the object's pixel
farthest from its boundary (the image border counts as boundary), the others random object
pixels; negative points are random pixels outside the box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from clinadapt.errors import DataError

__all__ = [
    "PER",
    "Prompt",
    "box3d_prompts",
    "box_of",
    "jitter_box",
    "negative_points",
    "object_prompt",
    "objects",
    "oracle_prompts",
    "positive_points",
    "slice_prompts",
]

PER = ("component", "instance")
"""One prompt per connected component of each class, or per annotated instance."""


@dataclass(frozen=True)
class Prompt:
    """The prompt for one object of class ``label``: its ``box`` (4,) and ``points`` (P, 2) as
    ``x, y`` with ``point_labels`` (P,), 1 inside the object and 0 outside (P may be 0)."""

    label: int
    box: np.ndarray
    points: np.ndarray
    point_labels: np.ndarray


def objects(mask: np.ndarray, instances: np.ndarray | None = None) -> list[tuple[int, np.ndarray]]:
    """``(class, region)`` of every object of a label map (2D or 3D), class by class: each
    connected component (pixels touching at edges or corners), or with ``instances`` (an
    instance map of the same shape, 0 = none) each instance, of the class most of its
    foreground pixels have. Instances over background only are no object."""
    mask = np.asarray(mask)
    if instances is None:
        structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
        out = []
        for c in np.unique(mask[mask > 0]):
            components, n = ndimage.label(mask == c, structure=structure)
            out += [(int(c), components == i) for i in range(1, n + 1)]
        return out
    instances = np.asarray(instances)
    if instances.shape != mask.shape:
        raise DataError(
            f"the instance map has shape {instances.shape} but its mask {mask.shape}; they must "
            "cover the same pixels"
        )
    found = []
    for i in np.unique(instances[instances > 0]):
        region = instances == i
        classes = mask[region]
        classes = classes[classes > 0]
        if classes.size:
            found.append((int(np.bincount(classes).argmax()), region))
    return sorted(found, key=lambda item: item[0])  # stable: instance order within a class


def box_of(region: np.ndarray) -> np.ndarray:
    """The ``[x0, y0, x1, y1]`` box of a 2D region's pixels (see module doc), float64."""
    ys, xs = np.nonzero(region)
    if xs.size == 0:
        raise DataError("an empty region has no box")
    x0, x1, y0, y1 = xs.min(), xs.max(), ys.min(), ys.max()
    return np.array([x0, y0, max(x1, x0 + 1), max(y1, y0 + 1)], dtype=np.float64)


def jitter_box(
    box: np.ndarray, shape: tuple[int, int], max_shift: int, rng: np.random.Generator
) -> np.ndarray:
    """``box`` with each side moved outward by a random 0..``max_shift`` px, clipped to an
    image of ``shape`` (H, W)."""
    if max_shift <= 0:
        return np.asarray(box, dtype=np.float64).copy()
    h, w = shape
    s = rng.integers(0, max_shift + 1, size=4)
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64)
    return np.array(
        [max(x0 - s[0], 0), max(y0 - s[1], 0), min(x1 + s[2], w), min(y1 + s[3], h)],
        dtype=np.float64,
    )


def _pick(candidates: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` of ``candidates``, without repeats where there are enough of them."""
    return rng.choice(candidates, size=k, replace=len(candidates) < k)


def positive_points(region: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """(k, 2) points ``x, y`` inside a 2D region: the pixel farthest from its boundary (the
    first in row-major order among equals), then k - 1 other pixels of it at random (repeated
    only where the region has fewer than k pixels)."""
    if k < 1:
        return np.zeros((0, 2), dtype=np.float64)
    region = np.asarray(region, dtype=bool)
    if not region.any():
        raise DataError("an empty region has no points inside it")
    distance = ndimage.distance_transform_edt(np.pad(region, 1))[1:-1, 1:-1]
    first = int(distance.argmax())
    rest = np.flatnonzero(region.ravel())
    rest = rest[rest != first]
    picked = [first]
    if k > 1:
        picked += list(_pick(rest, k - 1, rng)) if rest.size else [first] * (k - 1)
    ys, xs = np.unravel_index(np.asarray(picked), region.shape)
    return np.stack([xs, ys], axis=1).astype(np.float64)


def negative_points(
    box: np.ndarray,
    region: np.ndarray,
    k: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """(k, 2) random pixels ``x, y`` outside ``box`` (the pixels of columns x0..x1 and rows
    y0..y1); where the box covers the whole image, outside the object ``region`` instead; none
    where the object fills the image."""
    if k < 1:
        return np.zeros((0, 2), dtype=np.float64)
    h, w = region.shape
    x0, y0, x1, y1 = (int(v) for v in box)
    outside = np.ones((h, w), dtype=bool)
    outside[y0 : y1 + 1, x0 : x1 + 1] = False
    if not outside.any():
        outside = ~np.asarray(region, dtype=bool)
    candidates = np.flatnonzero(outside.ravel())
    if candidates.size == 0:
        return np.zeros((0, 2), dtype=np.float64)
    ys, xs = np.unravel_index(_pick(candidates, k, rng), (h, w))
    return np.stack([xs, ys], axis=1).astype(np.float64)


def oracle_prompts(
    mask: np.ndarray,
    *,
    instances: np.ndarray | None = None,
    jitter: int = 0,
    points: int = 0,
    negatives: int = 0,
    rng: np.random.Generator | None = None,
) -> list[Prompt]:
    """One ``Prompt`` per object of a 2D label map (``objects``): its box jittered by up to
    ``jitter`` px, ``points`` positive points inside it and ``negatives`` negative points
    outside the jittered box. A mask without foreground gives no prompt."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise DataError(f"oracle prompts are drawn from a 2D mask, got shape {mask.shape}")
    for name, value in (("jitter", jitter), ("points", points), ("negatives", negatives)):
        if value < 0:
            raise DataError(f"{name} must not be negative, got {value}")
    rng = rng if rng is not None else np.random.default_rng(0)
    return [
        object_prompt(label, region, jitter=jitter, points=points, negatives=negatives, rng=rng)
        for label, region in objects(mask, instances)
    ]


def object_prompt(
    label: int,
    region: np.ndarray,
    *,
    jitter: int,
    points: int,
    negatives: int,
    rng: np.random.Generator,
) -> Prompt:
    """The ``Prompt`` of one object of class ``label`` covering the 2D ``region``."""
    box = jitter_box(box_of(region), region.shape, jitter, rng)
    inside = positive_points(region, points, rng)
    outside = negative_points(box, region, negatives, rng)
    return Prompt(
        label,
        box,
        np.concatenate([inside, outside]),
        np.array([1] * len(inside) + [0] * len(outside), dtype=np.int64),
    )


def slice_prompts(
    volume: np.ndarray, rng: np.random.Generator, **options: int
) -> list[list[Prompt]]:
    """The ``oracle_prompts`` of every axial slice of a (D, H, W) label map, slice by slice
    (``options``: jitter, points, negatives)."""
    return [oracle_prompts(s, rng=rng, **options) for s in _volume(volume)]


def box3d_prompts(
    volume: np.ndarray, *, jitter: int = 0, rng: np.random.Generator | None = None
) -> list[list[Prompt]]:
    """Box prompts per axial slice from one 3D box per object of a (D, H, W) label map (each
    connected component of a class in 3D), drawn once: its in-plane box (of the object's
    pixels on all its slices, jittered once) on every slice from its first to its last."""
    volume = _volume(volume)
    rng = rng if rng is not None else np.random.default_rng(0)
    out: list[list[Prompt]] = [[] for _ in range(len(volume))]
    empty, no_labels = np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    for label, region in objects(volume):
        box = jitter_box(box_of(region.any(axis=0)), volume.shape[1:], jitter, rng)
        depth = np.flatnonzero(region.any(axis=(1, 2)))
        for z in range(depth[0], depth[-1] + 1):
            out[z].append(Prompt(label, box, empty, no_labels))
    return out


def _volume(volume: np.ndarray) -> np.ndarray:
    volume = np.asarray(volume)
    if volume.ndim != 3:
        raise DataError(f"volume prompts are drawn from a (D, H, W) mask, got shape {volume.shape}")
    return volume
