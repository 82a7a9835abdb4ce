"""Oracle prompts from ground-truth masks, against naive references: objects (components and
instances), boxes, jitter, positive and negative points, and the slice and 3D-box prompts of
volumes."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from clinadapt.backbones.sam import ImageFrame
from clinadapt.data.prompts import (
    box3d_prompts,
    box_of,
    jitter_box,
    negative_points,
    objects,
    oracle_prompts,
    positive_points,
    slice_prompts,
)
from clinadapt.errors import DataError


def naive_components(mask: np.ndarray) -> list[tuple[int, set]]:
    """(class, index set) of the components of a 2D or 3D label map, pixels touching at faces,
    edges or corners, by flood fill."""
    seen, out = set(), []
    steps = [d for d in itertools.product((-1, 0, 1), repeat=mask.ndim) if any(d)]
    for c in sorted(set(mask[mask > 0].tolist())):
        for start in itertools.product(*(range(n) for n in mask.shape)):
            if mask[start] != c or start in seen:
                continue
            stack, part = [start], set()
            seen.add(start)
            while stack:
                here = stack.pop()
                part.add(here)
                for d in steps:
                    there = tuple(a + b for a, b in zip(here, d, strict=True))
                    inside = all(0 <= t < n for t, n in zip(there, mask.shape, strict=True))
                    if inside and mask[there] == c and there not in seen:
                        seen.add(there)
                        stack.append(there)
            out.append((c, part))
    return out


def naive_box(pixels: set) -> list[float]:
    """The box of 2D pixels (y, x), or the in-plane box of 3D ones (z, y, x)."""
    ys, xs = [p[-2] for p in pixels], [p[-1] for p in pixels]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    return [x0, y0, x1 if x1 > x0 else x0 + 1, y1 if y1 > y0 else y0 + 1]


def pixel_set(region: np.ndarray) -> set:
    return set(zip(*(a.tolist() for a in np.nonzero(region)), strict=True))


def random_mask(seed: int, shape=(17, 23), classes=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = (rng.random(shape) < 0.12) * rng.integers(1, classes, shape)
    mask[2:6, 3:9] = 1  # one object surely larger than a pixel
    return mask.astype(np.uint8)


@pytest.mark.parametrize("seed", range(4))
def test_components_and_boxes_match_flood_fill(seed):
    mask = random_mask(seed)
    found = objects(mask)
    expected = naive_components(mask)
    assert sorted((c, sorted(pixel_set(r))) for c, r in found) == sorted(
        (c, sorted(p)) for c, p in expected
    )
    assert [c for c, _ in found] == sorted(c for c, _ in found)  # class by class
    prompts = oracle_prompts(mask)
    assert len(prompts) == len(expected)
    for prompt, (label, region) in zip(prompts, found, strict=True):
        assert prompt.label == label
        assert prompt.box.tolist() == naive_box(pixel_set(region))
        assert prompt.points.shape == (0, 2) and prompt.point_labels.shape == (0,)


def test_thin_objects_get_a_box_the_model_accepts():
    mask = np.zeros((6, 8), np.uint8)
    mask[1, 2:6] = 1  # a one-pixel-high line
    mask[3:6, 7] = 2  # a one-pixel-wide line on the right border
    mask[0, 0] = 1  # a single pixel
    boxes = {p.label: [] for p in oracle_prompts(mask)}
    for p in oracle_prompts(mask):
        boxes[p.label].append(p.box.tolist())
    assert sorted(boxes[1]) == [[0, 0, 1, 1], [2, 1, 5, 2]]
    assert boxes[2] == [[7, 3, 8, 5]]  # x1 = W: a box edge may lie on the border
    ImageFrame(mask.shape, 64).boxes([b for bs in boxes.values() for b in bs])
    with pytest.raises(DataError, match="empty region has no box"):
        box_of(np.zeros((3, 3), bool))


def test_instances_are_objects_even_where_they_touch():
    mask = np.zeros((10, 10), np.uint8)
    mask[2:6, 1:9] = 1
    instances = np.zeros((10, 10), np.int32)
    instances[2:6, 1:5], instances[2:6, 5:9] = 1, 2  # two nuclei side by side
    instances[8, 8] = 3  # an instance on background: no object
    assert len(oracle_prompts(mask)) == 1
    prompts = oracle_prompts(mask, instances=instances)
    assert [p.box.tolist() for p in prompts] == [[1, 2, 4, 5], [5, 2, 8, 5]]
    with pytest.raises(DataError, match="instance map has shape"):
        objects(mask, instances[:5])


def test_a_mask_without_foreground_gives_no_prompt():
    assert oracle_prompts(np.zeros((5, 7), np.uint8), points=2, negatives=1, jitter=3) == []
    assert box3d_prompts(np.zeros((3, 5, 7), np.uint8)) == [[], [], []]


def test_jitter_moves_each_side_outward_within_bounds_and_clips():
    rng = np.random.default_rng(0)
    box, shape, n = np.array([5.0, 4.0, 12.0, 9.0]), (14, 15), 3
    seen = []
    for _ in range(300):
        j = jitter_box(box, shape, n, rng)
        shift = [box[0] - j[0], box[1] - j[1], j[2] - box[2], j[3] - box[3]]
        assert all(0 <= s <= n for s in shift)
        seen.append(shift)
    assert all(set(side) == {0, 1, 2, 3} for side in np.array(seen).T.tolist())
    for _ in range(50):  # near the border: clipped to 0..W, 0..H
        j = jitter_box(np.array([1.0, 0.0, 14.0, 13.0]), shape, 5, rng)
        assert j[0] >= 0 and j[1] == 0 and j[2] <= 15 and j[3] <= 14
    assert jitter_box(box, shape, 0, rng).tolist() == box.tolist()


def naive_depth(region: np.ndarray, y: int, x: int) -> float:
    """Distance from pixel (y, x) to the nearest pixel outside the region, the image border's
    outside included."""
    h, w = region.shape
    best = math.inf
    for oy in range(-1, h + 1):
        for ox in range(-1, w + 1):
            inside = 0 <= oy < h and 0 <= ox < w and region[oy, ox]
            if not inside:
                best = min(best, math.hypot(oy - y, ox - x))
    return best


@pytest.mark.parametrize("seed", range(3))
def test_the_first_positive_point_is_farthest_from_the_boundary(seed):
    rng = np.random.default_rng(seed)
    region = np.zeros((12, 14), bool)
    region[1:9, 2:12] = True
    region[rng.random(region.shape) < 0.15] = False
    region[0, :] = True  # touches the border: the border is boundary too
    points = positive_points(region, 4, np.random.default_rng(seed))
    depth = {
        (y, x): naive_depth(region, y, x)
        for y, x in itertools.product(range(12), range(14))
        if region[y, x]
    }
    x, y = points[0].astype(int)
    deepest = max(depth.values())
    assert depth[(y, x)] == pytest.approx(deepest)
    first_deepest = min(p for p, d in depth.items() if d == pytest.approx(deepest))
    assert (y, x) == first_deepest  # row-major first among equals
    assert all(region[int(py), int(px)] for px, py in points)
    assert len({tuple(p) for p in points.tolist()}) == 4  # no repeats while there are pixels


def test_points_of_tiny_objects_repeat_and_negatives_lie_outside_the_box():
    region = np.zeros((9, 9), bool)
    region[4, 4] = True
    rng = np.random.default_rng(1)
    assert positive_points(region, 3, rng).tolist() == [[4, 4]] * 3
    box = np.array([2.0, 3.0, 6.0, 5.0])
    negatives = negative_points(box, region, 20, rng)
    assert negatives.shape == (20, 2)
    for x, y in negatives:
        assert not (2 <= x <= 6 and 3 <= y <= 5)
    whole = np.array([0.0, 0.0, 9.0, 9.0])  # the box covers the image: outside the object
    assert all((x, y) != (4, 4) for x, y in negative_points(whole, region, 10, rng).tolist())
    full = np.ones((3, 3), bool)
    assert negative_points(np.array([0.0, 0.0, 3.0, 3.0]), full, 2, rng).shape == (0, 2)


def test_prompts_with_points_and_seeded_randomness():
    mask = random_mask(7)
    options = {"jitter": 2, "points": 3, "negatives": 2}
    first = oracle_prompts(mask, rng=np.random.default_rng(5), **options)
    again = oracle_prompts(mask, rng=np.random.default_rng(5), **options)
    other = oracle_prompts(mask, rng=np.random.default_rng(6), **options)
    pack = lambda ps: [(p.box.tolist(), p.points.tolist()) for p in ps]  # noqa: E731
    assert pack(first) == pack(again) and pack(first) != pack(other)
    for p, (_, region) in zip(first, objects(mask), strict=True):
        assert p.point_labels.tolist() == [1, 1, 1, 0, 0]
        assert all(region[int(y), int(x)] for x, y in p.points[:3])
        x0, y0, x1, y1 = p.box
        assert all(not (x0 <= x <= x1 and y0 <= y <= y1) for x, y in p.points[3:])
    with pytest.raises(DataError, match="points must not be negative"):
        oracle_prompts(mask, points=-1)
    with pytest.raises(DataError, match="2D mask"):
        oracle_prompts(mask[None])


def test_slice_prompts_are_each_slices_own():
    volume = np.stack([random_mask(s, (9, 11)) for s in range(3)] + [np.zeros((9, 11), np.uint8)])
    per_slice = slice_prompts(volume, np.random.default_rng(0))
    assert len(per_slice) == 4 and per_slice[3] == []
    for prompts, mask in zip(per_slice, volume, strict=True):
        assert [p.box.tolist() for p in prompts] == [p.box.tolist() for p in oracle_prompts(mask)]


def test_box3d_gives_one_in_plane_box_on_every_slice_of_the_object():
    volume = np.zeros((7, 12, 12), np.uint8)
    for z in range(1, 5):  # a diagonal object: each slice's box is smaller than the 3D box
        volume[z, z : z + 3, 2 * z : 2 * z + 2] = 1
    volume[3, 9:11, 0:2] = 2  # another class, one slice
    per_slice = box3d_prompts(volume)
    assert [len(p) for p in per_slice] == [0, 1, 1, 2, 1, 0, 0]
    for z in range(1, 5):
        (obj,) = [p for p in per_slice[z] if p.label == 1]
        assert obj.box.tolist() == [2, 1, 9, 6]
        assert obj.points.shape == (0, 2)
    (other,) = [p for p in per_slice[3] if p.label == 2]
    assert other.box.tolist() == [0, 9, 1, 10]
    jittered = box3d_prompts(volume, jitter=2, rng=np.random.default_rng(0))
    boxes = {tuple(p.box.tolist()) for ps in jittered for p in ps if p.label == 1}
    assert len(boxes) == 1  # drawn once for the whole object
    with pytest.raises(DataError, match=r"\(D, H, W\)"):
        box3d_prompts(volume[0])
