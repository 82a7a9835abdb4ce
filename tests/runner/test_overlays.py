import math

import numpy as np
import pytest
from PIL import Image

from clinadapt.errors import ConfigError, DataError
from clinadapt.runner.overlays import overlay_png, pick_cases, pick_slice


def naive_order(values: list, lower_is_better: bool) -> list[int]:
    """Best to worst: defined values by value (stable, so ties keep index order), then the
    undefined ones in index order."""
    defined = [i for i, v in enumerate(values) if v is not None and not math.isnan(v)]
    undefined = [i for i in range(len(values)) if i not in defined]
    return sorted(defined, key=lambda i: values[i] if lower_is_better else -values[i]) + undefined


@pytest.mark.parametrize("metric", ["mean_fg_dice", "mean_fg_hd95", "hd95_2", "nsd_1"])
def test_pick_cases_matches_a_naive_sort(metric):
    rng = np.random.default_rng(0)
    lower = "hd95" in metric
    for _ in range(200):
        n = int(rng.integers(1, 12))
        pool = [0.0, 0.5, 0.5, 1.0, math.nan, None, *rng.random(3).tolist()]
        values = [pool[j] for j in rng.integers(0, len(pool), n)]
        cases = [{"id": f"c{i}", metric: v} for i, v in enumerate(values)]
        order = naive_order(values, lower)
        expected = {"best": order[0], "median": order[(n - 1) // 2], "worst": order[-1]}
        assert pick_cases(cases, metric) == expected, values


def test_pick_cases_ranks_undefined_values_worst_and_breaks_ties_by_index():
    cases = [{"mean_fg_dice": v} for v in (0.9, math.nan, 0.9, 0.2, 0.5)]
    assert pick_cases(cases) == {"best": 0, "median": 4, "worst": 1}
    hd95 = [{"mean_fg_hd95": v} for v in (3.0, None, 1.0, 7.5)]
    assert pick_cases(hd95, "mean_fg_hd95") == {"best": 2, "median": 0, "worst": 1}


def test_pick_cases_refuses_no_cases_and_unknown_metrics():
    with pytest.raises(DataError, match="no cases"):
        pick_cases([])
    with pytest.raises(ConfigError, match=r"case 1 \(b\) has no metric 'dice'"):
        pick_cases([{"id": "a", "dice": 1.0}, {"id": "b", "mean_fg_dice": 1.0}], "dice")


def test_pick_slice_prefers_truth_then_prediction_then_the_middle():
    truth, pred = np.zeros((7, 4, 4), int), np.zeros((7, 4, 4), int)
    assert pick_slice(truth, pred) == 3
    pred[5, :2] = 1
    pred[1, :1] = 2
    assert pick_slice(truth, pred) == 5
    truth[2, 0, 0] = 1
    truth[4, :2, :2] = 2
    assert pick_slice(truth, pred) == 4
    truth[6, :2, :2] = 1  # as much foreground as slice 4: the first one wins
    assert pick_slice(truth, pred) == 4
    assert pick_slice(np.zeros((4, 2, 2)), np.zeros((4, 2, 2))) == 2


def blob(shape: tuple[int, ...], value: int = 1) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.int64)
    mask[..., shape[-2] // 4 : shape[-2] // 2, shape[-1] // 4 : 3 * shape[-1] // 4] = value
    return mask


def read_png(path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize(
    "image",
    [
        np.random.default_rng(0).normal(-500.0, 300.0, (30, 40)),  # CT-like float
        np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8),
        np.full((30, 40), 7, dtype=np.uint16),  # constant
    ],
    ids=["float", "rgb", "constant"],
)
def test_overlay_png_is_a_picture_of_three_panels(tmp_path, image):
    truth = blob((30, 40))
    truth[0:3, 0:3] = 2  # touches the border
    path = overlay_png(
        image, truth, np.roll(truth, 3, axis=1), tmp_path / "best", title="case a", num_classes=3
    )
    assert path == tmp_path / "best.png" and list(tmp_path.iterdir()) == [path]
    pixels = read_png(path)
    assert 1000 <= pixels.shape[1] <= 1500 and 300 <= pixels.shape[0] <= 1000


def test_overlay_draws_each_mask_in_its_own_panel(tmp_path):
    image = np.random.default_rng(1).random((32, 32))
    truth = blob((32, 32), value=2)
    kwargs = {"title": "t", "num_classes": 3, "labels": ("background", "liver", "tumour")}
    same = read_png(overlay_png(image, truth, truth, tmp_path / "same", **kwargs))
    empty = read_png(overlay_png(image, truth, np.zeros_like(truth), tmp_path / "empty", **kwargs))
    third = same.shape[1] // 3
    legend = same.shape[0] - 40  # the legend lists the classes, not what is drawn
    assert np.array_equal(same[:legend, : 2 * third], empty[:legend, : 2 * third])
    assert not np.array_equal(same[:legend, 2 * third :], empty[:legend, 2 * third :])
    assert not np.array_equal(same[:legend, :third], same[:legend, third : 2 * third])


def test_overlay_of_a_volume_shows_the_chosen_slice(tmp_path):
    volume = np.zeros((9, 24, 24))
    truth = np.zeros((9, 24, 24), dtype=np.int64)
    truth[6] = blob((24, 24))
    volume[6] = np.random.default_rng(2).random((24, 24))  # only slice 6 has texture
    flat = read_png(
        overlay_png(volume, truth * 0, truth * 0, tmp_path / "flat", title="v", num_classes=2)
    )
    shown = read_png(
        overlay_png(volume, truth, truth * 0, tmp_path / "shown", title="v", num_classes=2)
    )
    third = shown.shape[1] // 3
    middle, centre = shown.shape[0] // 2, third // 2
    image_panel = slice(middle - 50, middle + 50), slice(centre - 50, centre + 50)
    assert flat[image_panel].std() < 1  # both masks empty: the middle slice, which is blank
    assert shown[image_panel].std() > 10  # ground truth on slice 6: its texture is shown


@pytest.mark.parametrize(
    ("image", "truth", "pred", "match"),
    [
        (np.zeros((8, 8)), np.zeros((8, 8)), np.zeros((8, 9)), r"prediction has shape \(8, 9\)"),
        (np.zeros((8, 9)), np.zeros((8, 8)), np.zeros((8, 8)), r"image has shape \(8, 9\)"),
        (np.zeros((8, 8, 4)), np.zeros((8, 8)), np.zeros((8, 8)), r"\(8, 8, 3\)"),
        (np.zeros((3, 8, 8)), np.zeros((8, 8)), np.zeros((8, 8)), "channels last"),
        (np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8)), np.zeros((2, 8, 8)), r"\(2, 8, 8\)"),
        (np.zeros(8), np.zeros(8), np.zeros(8), "2D"),
        (np.full((8, 8), np.nan), np.zeros((8, 8)), np.zeros((8, 8)), "NaN"),
        (np.zeros((8, 8)), np.full((8, 8), 3), np.zeros((8, 8)), "ground truth .* label 3"),
        (np.zeros((8, 8)), np.zeros((8, 8)), np.full((8, 8), 0.5), "prediction .* non-integer"),
    ],
)
def test_bad_inputs_raise_data_errors_and_leave_no_file(tmp_path, image, truth, pred, match):
    with pytest.raises(DataError, match=match):
        overlay_png(image, truth, pred, tmp_path / "o", title="t", num_classes=3)
    assert not list(tmp_path.iterdir())


def test_bad_options_raise_config_errors(tmp_path):
    mask = np.zeros((8, 8), dtype=np.int64)
    with pytest.raises(ConfigError, match="labels must name all 3 classes"):
        overlay_png(mask, mask, mask, tmp_path / "o", title="t", num_classes=3, labels=("a", "b"))
    with pytest.raises(ConfigError, match=r"written as \.png"):
        overlay_png(mask, mask, mask, tmp_path / "o.jpg", title="t", num_classes=2)
    assert not list(tmp_path.iterdir())


def test_overlay_without_ground_truth_has_two_panels_and_draws_prompts(tmp_path):
    image = np.random.default_rng(3).integers(0, 256, (40, 60), dtype=np.uint8)
    pred = blob((40, 60))
    kwargs = {"title": "scan", "num_classes": 2}
    plain = read_png(overlay_png(image, None, pred, tmp_path / "plain", **kwargs))
    three = read_png(overlay_png(image, pred, pred, tmp_path / "three", **kwargs))
    assert plain.shape[1] < 0.75 * three.shape[1]  # image and prediction only
    prompted = read_png(
        overlay_png(
            image,
            None,
            pred,
            tmp_path / "prompted",
            boxes=[[10, 8, 50, 30]],
            points=[(20, 15, 1), (5, 35, 0)],
            **kwargs,
        )
    )
    assert prompted.shape == plain.shape
    half, legend = plain.shape[1] // 2, plain.shape[0] - 40
    for panel in (slice(0, half), slice(half, None)):  # drawn on both panels
        assert not np.array_equal(prompted[:legend, panel], plain[:legend, panel])
    with pytest.raises(ConfigError, match="prompts are drawn on 2D overlays"):
        overlay_png(
            np.zeros((3, 8, 8)),
            None,
            np.zeros((3, 8, 8)),
            tmp_path / "v",
            boxes=[[1, 1, 4, 4]],
            **kwargs,
        )
