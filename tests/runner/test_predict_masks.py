"""``clinadapt predict`` for segmentation runs: one mask per input at its own size, masks.csv."""

import csv
import json

import numpy as np
import pytest
from PIL import Image

from clinadapt.cli import main
from clinadapt.data import seg_files as sf
from clinadapt.engine.predict import predict_masks
from clinadapt.errors import ConfigError, DataError
from clinadapt.runner.experiment import ExperimentConfig, run_experiment
from clinadapt.runner.predict import MASKS_CSV, load_run, predict_masks_files
from clinadapt.runner.records import write_json_atomic

nib = pytest.importorskip("nibabel")


def rotation_affine() -> np.ndarray:
    """Anisotropic voxels, a rotation, a flip and an offset: nothing an identity would match."""
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, -1.0]]) @ np.diag(
        [0.7, 0.8, 2.5]
    )
    affine[:3, 3] = [-90.5, 12.25, 40.0]
    return affine


def square_image(h: int, w: int, seed: int, channels: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 60, (h, w), dtype=np.uint8)
    image[h // 4 : h // 4 + h // 3, w // 5 : w // 5 + w // 3] = 220
    return np.repeat(image[..., None], 3, axis=-1) if channels == 3 else image


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def save_nifti(path, array, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def cube_volume(shape, seed):
    """(file-axes volume, label) with a bright box."""
    rng = np.random.default_rng(seed)
    volume = rng.normal(100, 10, shape).astype(np.float32)
    label = np.zeros(shape, np.uint8)
    box = tuple(slice(n // 4, n // 4 + n // 2) for n in shape)
    volume[box] += 300
    label[box] = 1
    return volume, label


def train_run(run_dir, dataset, backbone, **options):
    cfg = ExperimentConfig(
        dataset=str(dataset),
        backbone=backbone,
        weights="none",
        method="full",
        shots="all",
        train={"epochs": 1},
        bootstrap=0,
        precision="fp32",
        **options,
    )
    record = run_experiment(cfg, run_dir=run_dir, progress=False)
    write_json_atomic(run_dir / "record.json", record)
    return run_dir


@pytest.fixture(scope="module")
def run_2d(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("seg2d")
    for i in range(10):
        h, w = 24 + i, 40 - i
        image = square_image(h, w, i)
        mask = np.where(image == 220, 255, 0).astype(np.uint8)
        save_png(root / "data" / "images" / f"c{i}.png", image)
        save_png(root / "data" / "masks" / f"c{i}.png", mask)
    return train_run(root / "run", root / "data", "test_unet", input_size=32)


def msd_folder(root, n=10):
    for i in range(n):
        volume, label = cube_volume((12, 10, 8), i)
        save_nifti(root / "imagesTr" / f"case_{i}.nii.gz", volume, rotation_affine())
        save_nifti(root / "labelsTr" / f"case_{i}.nii.gz", label, rotation_affine())
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "tumour"}}))
    return root


@pytest.fixture(scope="module")
def run_3d(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("seg3d")
    data = msd_folder(root / "data")
    return train_run(root / "run", data, "test_unet3d", input_size=16, resize="pad")


def rows(path):
    return list(csv.DictReader(path.open()))


def test_2d_masks_have_each_inputs_size_and_match_the_model(run_2d, tmp_path):
    inputs = {
        "small": save_png(tmp_path / "in" / "small.png", square_image(20, 30, 1)),
        "wide.scan": save_png(tmp_path / "in" / "wide.scan.jpg", square_image(45, 61, 2)),
        "colour": save_png(tmp_path / "in" / "colour.png", square_image(33, 27, 3, channels=3)),
    }
    out = tmp_path / "out"
    csv_path = predict_masks_files(run_2d, [str(p) for p in inputs.values()], out, progress=False)
    assert csv_path == out / MASKS_CSV
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MASKS_CSV, "small.png", "wide.scan.png", "colour.png"]
    )
    _, model, _, preprocess = load_run(run_2d)
    table = rows(csv_path)
    assert list(table[0]) == ["source", "mask", "fraction_foreground"]
    for row, (stem, source) in zip(table, inputs.items(), strict=True):
        assert row["source"] == str(source) and row["mask"] == f"{stem}.png"
        gray = np.asarray(Image.open(source).convert("L"))
        mask = sf.read_mask(out / row["mask"], gray.shape, "threshold", 2)  # as clinadapt reads
        [expected] = predict_masks(model, [gray], preprocess=preprocess, progress=False)
        np.testing.assert_array_equal(mask, expected)
        assert float(row["fraction_foreground"]) == pytest.approx(mask.mean(), abs=1e-6)


def test_folders_keep_their_sub_folders_so_equal_names_stay_apart(run_2d, tmp_path):
    save_png(tmp_path / "in" / "p1" / "slice.png", square_image(20, 20, 1))
    save_png(tmp_path / "in" / "p2" / "slice.png", square_image(26, 22, 2))
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    csv_path = predict_masks_files(run_2d, [str(tmp_path / "in")], tmp_path / "out", progress=False)
    assert [r["mask"] for r in rows(csv_path)] == ["p1/slice.png", "p2/slice.png"]
    assert sf.decode_mask(tmp_path / "out" / "p2" / "slice.png").shape == (26, 22)


def test_two_inputs_with_one_name_are_refused_before_any_mask(run_2d, tmp_path):
    a = save_png(tmp_path / "a" / "x.png", square_image(20, 20, 1))
    b = save_png(tmp_path / "b" / "x.jpg", square_image(20, 20, 2))
    with pytest.raises(DataError, match=r"x.png and .*x.jpg would both be written"):
        predict_masks_files(run_2d, [str(a), str(b)], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_masks_never_overwrite_the_inputs(run_2d, tmp_path):
    source = save_png(tmp_path / "in" / "x.png", square_image(20, 20, 1))
    with pytest.raises(ConfigError, match="would overwrite the input"):
        predict_masks_files(run_2d, [str(source)], tmp_path / "in", progress=False)
    np.testing.assert_array_equal(np.asarray(Image.open(source)), square_image(20, 20, 1))


def test_a_failing_input_keeps_earlier_masks_and_writes_no_csv(run_2d, tmp_path):
    good = save_png(tmp_path / "in" / "a_good.png", square_image(20, 20, 1))
    bad = tmp_path / "in" / "b_bad.png"
    bad.write_bytes(b"\x89PNG broken")
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"b_bad.png") as err:
        predict_masks_files(run_2d, [str(good), str(bad)], out, progress=False)
    assert f"stopped at {bad} (the 1 masks before it are in {out})" in str(err.value)
    assert f"fix or remove {bad} and run again" in str(err.value)
    assert [p.name for p in out.iterdir()] == ["a_good.png"]  # no CSV, no temporary files


@pytest.mark.parametrize("what", ["volume for a 2D run", "image for a 3D run", "npz", "dicom"])
def test_inputs_of_the_wrong_kind_are_refused_before_any_mask(run_2d, run_3d, tmp_path, what):
    png = save_png(tmp_path / "x.png", square_image(20, 20, 1))
    nii = save_nifti(tmp_path / "v.nii.gz", cube_volume((8, 8, 8), 0)[0], np.eye(4))
    npz = tmp_path / "s.npz"
    np.savez(npz, images=np.zeros((2, 20, 20), np.uint8))
    dcm = tmp_path / "slice.dcm"
    dcm.write_bytes(b"")
    run, inputs, pattern = {
        "volume for a 2D run": (
            run_2d,
            [png, nii],
            r"v.nii.gz is a volume but this run segments 2D",
        ),
        "image for a 3D run": (
            run_3d,
            [nii, png],
            r"x.png is a 2D image but this run segments vol",
        ),
        "npz": (run_2d, [png, npz], r"cannot read .*s.npz: a segmentation run takes image files"),
        "dicom": (run_3d, [nii, dcm], r"slice.dcm: DICOM .* convert the series to NIfTI"),
    }[what]
    with pytest.raises(DataError, match=pattern):
        predict_masks_files(run, [str(p) for p in inputs], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_3d_masks_lie_on_the_inputs_voxel_grid(run_3d, tmp_path):
    affine = rotation_affine()
    affine[:3, 3] = [5.0, -7.5, 3.0]
    volume, _ = cube_volume((14, 9, 11), 7)
    source = save_nifti(tmp_path / "in" / "patient.nii.gz", volume, affine)
    csv_path = predict_masks_files(run_3d, [str(source)], tmp_path / "out", progress=False)
    [row] = rows(csv_path)
    assert list(row) == ["source", "mask", "voxels_tumour", "volume_mm3_tumour"]
    assert row["mask"] == "patient.nii.gz"
    written = nib.load(str(tmp_path / "out" / row["mask"]))
    np.testing.assert_allclose(written.affine, affine)
    assert written.shape == (14, 9, 11)
    _, model, _, preprocess = load_run(run_3d)
    [expected] = predict_masks(
        model, [sf.read_nifti_image(source)], preprocess=preprocess, progress=False
    )
    mask = np.asarray(written.dataobj)
    np.testing.assert_array_equal(mask, expected.transpose(2, 1, 0))
    assert int(row["voxels_tumour"]) == int((mask == 1).sum())
    assert float(row["volume_mm3_tumour"]) == pytest.approx(
        int(row["voxels_tumour"]) * 0.7 * 0.8 * 2.5
    )


def test_a_volume_larger_than_a_pad_run_takes_is_named(run_3d, tmp_path):
    source = save_nifti(tmp_path / "big.nii.gz", cube_volume((20, 9, 9), 0)[0], np.eye(4))
    with pytest.raises(ConfigError, match=r"cannot fit 9x9x20 .*\n.*stopped at .*big.nii.gz"):
        predict_masks_files(run_3d, [str(source)], tmp_path / "out", progress=False)


def test_a_3d_run_through_a_2d_backbone_segments_slice_by_slice(tmp_path, one_thread):
    run = train_run(tmp_path / "run", msd_folder(tmp_path / "data"), "test_unet", input_size=16)
    source = save_nifti(tmp_path / "in" / "p.nii", cube_volume((13, 10, 6), 3)[0], np.eye(4))
    predict_masks_files(run, [str(source)], tmp_path / "out", progress=False)
    assert nib.load(str(tmp_path / "out" / "p.nii.gz")).shape == (13, 10, 6)


def test_cli_writes_the_mask_folder(run_2d, tmp_path, capsys):
    source = save_png(tmp_path / "x.png", square_image(21, 35, 1))
    out = tmp_path / "masks"
    assert main(["predict", str(run_2d), str(source), "--out", str(out), "--quiet"]) == 0
    assert f"masks written to {out}" in capsys.readouterr().out
    assert [r["mask"] for r in rows(out / MASKS_CSV)] == ["x.png"]
    assert sf.decode_mask(out / "x.png").shape == (21, 35)


def test_cli_refuses_a_csv_or_a_file_as_the_mask_folder_before_any_work(
    run_2d, tmp_path, capsys, monkeypatch
):
    import clinadapt.runner.predict

    def started(*args, **kwargs):
        raise AssertionError("the run was loaded before --out was checked")

    monkeypatch.setattr(clinadapt.runner.predict, "load_run", started)
    source = save_png(tmp_path / "x.png", square_image(21, 35, 1))
    assert main(["predict", str(run_2d), str(source), "--out", str(tmp_path / "p.csv")]) == 2
    assert "a segmentation run writes a folder of masks" in capsys.readouterr().err
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    assert main(["predict", str(run_2d), str(source), "--out", str(blocker)]) == 2
    assert "plain-file is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()
