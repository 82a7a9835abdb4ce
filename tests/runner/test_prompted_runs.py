"""Zero-shot promptable segmentation runs (sam_box, sam_point, sam_box_point, box_mask) with a
tiny random SAM on tiny synthetic folders (image/mask PNGs, DSB2018-style instances, multi-class
NIfTI volumes), through run_experiment, the bench, the report and the CLI; and sam_box with the
real LiteMedSAM weights on Kvasir-SEG test cases."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from backbones.test_sam import TINY_TINYVIT, randomized, save_folder  # tests/ is on the path
from clinadapt.backbones.sam import load_sam, preprocess
from clinadapt.cli import main
from clinadapt.data import load_dataset
from clinadapt.data.prompts import oracle_prompts
from clinadapt.errors import ClinadaptError, ConfigError
from clinadapt.eval.segmentation import case_metrics
from clinadapt.runner.bench import GridConfig, run_grid
from clinadapt.runner.experiment import ExperimentConfig, run_experiment
from clinadapt.runner.records import read_records
from clinadapt.runner.report import build_report
from clinadapt.tasks import TASKS
from clinadapt.tasks.segmentation import NSD_TOLERANCE
from data.test_prompts import naive_box, naive_components  # tests/data

from .test_segmentation_runs import pairs_folder

pytestmark = pytest.mark.usefixtures("one_thread")

TASK = TASKS.get("segmentation")
SHARED = Path(__file__).resolve().parents[2].parent / "shared"
LITEMEDSAM_DIR = SHARED / "weights" / "litemedsam"


# --- data and weights ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam_weights(tmp_path_factory) -> Path:
    config = {"image_encoder": {"img_size": 64}, "mask_decoder": {"transformer": {"num_heads": 2}}}
    return save_folder(randomized(TINY_TINYVIT), tmp_path_factory.mktemp("w") / "sam", config)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Kvasir-like: colour images of varying sizes, a square each, test case 11 empty."""
    return pairs_folder(tmp_path_factory.mktemp("data") / "polyps")


@pytest.fixture(scope="module")
def nuclei(tmp_path_factory) -> Path:
    """DSB2018 layout: one PNG per nucleus; test case n2 has two touching nuclei of different
    heights (their component's box is not the union of theirs) and one apart."""
    root = tmp_path_factory.mktemp("data") / "nuclei"
    rng = np.random.default_rng(2)
    layouts = {
        "n0": [(slice(2, 7), slice(3, 9))],
        "n1": [(slice(10, 15), slice(4, 8))],
        "n2": [
            (slice(3, 8), slice(2, 7)),
            (slice(5, 11), slice(7, 12)),  # touches the first: one component, a larger box
            (slice(13, 17), slice(14, 19)),
        ],
        "n3": [(slice(5, 11), slice(6, 13))],
    }
    for case, nuclei_at in layouts.items():
        (root / "stage1_train" / case / "images").mkdir(parents=True)
        (root / "stage1_train" / case / "masks").mkdir()
        image = rng.integers(0, 60, (20, 22, 3), dtype=np.uint8)
        for k, at in enumerate(nuclei_at):
            mask = np.zeros((20, 22), np.uint8)
            mask[at] = 255
            image[at] = 200
            Image.fromarray(mask).save(root / "stage1_train" / case / "masks" / f"m{k}.png")
        Image.fromarray(image).save(root / "stage1_train" / case / "images" / f"{case}.png")
    (root / "cases.csv").write_text("id,split\nn0,train\nn1,val\nn2,test\nn3,test\n")
    return root


def volume_label(i: int) -> np.ndarray:
    """(D, H, W) = (6, 12, 12): a diagonal class-1 object over slices 1-4 (each slice's box is
    smaller than its 3D box) and an L-shaped class 2 whose boxes overlap class 1's; case 3
    empty."""
    label = np.zeros((6, 12, 12), np.uint8)
    if i == 3:
        return label
    for z in range(1, 5):
        label[z, z : z + 3, 2 * z : 2 * z + 2] = 1
    label[3:5, 7:9, 4 + i % 2 : 12] = 2  # an L whose box holds class 1's pixels on slices 3-4
    label[3:5, 2:9, 11] = 2
    return label


@pytest.fixture(scope="module")
def volumes(tmp_path_factory) -> Path:
    nib = pytest.importorskip("nibabel")
    root = tmp_path_factory.mktemp("data") / "msd3"
    rng = np.random.default_rng(3)
    rows = ["id,split"]
    for i, split in enumerate(["train", "val", "test", "test", "test"]):
        label = volume_label(i)
        image = rng.normal(100, 20, label.shape).astype(np.float32) + 300.0 * label
        for sub, array in (("imagesTr", image), ("labelsTr", label)):
            (root / sub).mkdir(parents=True, exist_ok=True)
            affine = np.diag([0.9, 0.8, 2.5, 1.0])  # file axes x, y, z
            nifti = nib.Nifti1Image(array.transpose(2, 1, 0), affine)
            nib.save(nifti, str(root / sub / f"v{i}.nii.gz"))
        rows.append(f"v{i},{split}")
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    labels = {"0": "background", "1": "front", "2": "back"}
    (root / "dataset.json").write_text(json.dumps({"labels": labels}))
    return root


def config(dataset: Path, weights: Path, method: str, **options) -> ExperimentConfig:
    extra = {k: options.pop(k) for k in ("seed", "train", "precision") if k in options}
    return ExperimentConfig(
        dataset=str(dataset),
        backbone="litemedsam",
        weights=str(weights),
        method=method,
        method_options=options,
        bootstrap=20,
        **extra,
    )


def run(cfg: ExperimentConfig, run_dir: Path | None = None) -> tuple[dict, list[np.ndarray]]:
    """The record of a run and the label maps it scored."""
    seen: dict = {}
    real = type(TASK).score_cases

    def spy(self, predictions, targets):
        seen["predictions"] = [np.asarray(p) for p in predictions]
        return real(self, predictions, targets)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(type(TASK), "score_cases", spy)
        record = run_experiment(cfg, run_dir=run_dir, progress=False)
    return record, seen["predictions"]


def fill_boxes(shape: tuple[int, ...], objects: list[tuple[int, list]], zs=None) -> np.ndarray:
    """Each object's box filled (columns x0..x1, rows y0..y1), on slices ``zs[i]`` of a volume;
    where boxes of two classes overlap the lower class wins."""
    out = np.zeros(shape, np.uint8)
    for i in sorted(range(len(objects)), key=lambda i: -objects[i][0]):
        label, (x0, y0, x1, y1) = objects[i]
        where = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        if zs is None:
            out[where] = label
        else:
            out[(zs[i], *where)] = label
    return out


def same(a, b) -> bool:
    if isinstance(a, float) and math.isnan(a):
        return b is None or math.isnan(b)
    return a == b


# --- records ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def box_run(pairs, sam_weights, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "sam_box"
    return (*run(config(pairs, sam_weights, "sam_box"), run_dir), run_dir)


def test_a_sam_box_run_records_oracle_prompts_and_scores_every_case(box_run, pairs, sam_weights):
    record, predictions, run_dir = box_run
    test = load_dataset(str(pairs))["test"]
    assert record["kind"] == "prompted" and record["task"] == "segmentation"
    method = record["method"]
    assert method["kind"] == "prompted" and method["prompt"] == "box"
    assert method["fitted_parameters"] == method["trainable_backbone_parameters"] == 0
    assert record["labels_used"] == {"train": 0, "val": 0, "total": 0}
    assert record["shots"]["support_size"] == 0
    prompts = record["prompts"]
    assert prompts["oracle"] is True and "ground-truth bounding box" in prompts["how"]
    assert prompts["cases_without_foreground"] == 1 == record["dataset"]["empty_masks"]["test"]
    assert prompts["prompts"] == prompts["prompted_images"] == 3 and prompts["random"] is False
    assert record["backbone"]["architecture"] == "tinyvit" and record["backbone"]["is_pretrained"]
    assert record["backbone"]["parameters"] == sum(
        p.numel() for p in randomized(TINY_TINYVIT).parameters()
    )
    timings = record["timings"]
    assert timings["seconds_per_case"] == pytest.approx(timings["predict_s"] / len(test))
    assert timings["run_s"] >= timings["predict_s"] > 0 and record["peak_memory_mb"] > 0

    assert [p.shape for p in predictions] == [m.shape for m in test.labels]
    empty = [i for i, m in enumerate(test.labels) if not m.any()]
    assert empty and all(not predictions[i].any() for i in empty)
    cases = record["metrics"]["test"]["cases"]
    assert [c["id"] for c in cases] == [m["id"] for m in test.meta]
    for pred, truth, case in zip(predictions, test.labels, cases, strict=True):
        expected = case_metrics(pred, truth, 2, spacing=None, nsd_tolerance_mm=NSD_TOLERANCE)
        assert all(same(case[k], v) for k, v in expected.items())
    assert set(record["metrics"]["test_ci95"]) == {"dice", "iou", "hd95", "nsd"}
    assert set(record["overlays"]) == {"best", "median", "worst"}
    assert all((run_dir / f).is_file() for f in record["overlays"].values())

    model = load_sam(sam_weights)  # the runner's mask is SAM's mask for the ground-truth box
    i = next(i for i, m in enumerate(test.labels) if m.any())
    (prompt,) = oracle_prompts(test.labels[i])
    x, frame = preprocess(test.images[i], model.image_size)
    with torch.no_grad():
        logits = model.predict_masks(model.embed_image(x[None]), boxes=frame.boxes(prompt.box))
    assert np.array_equal(predictions[i], frame.masks(logits)[0].numpy().astype(np.uint8))


def test_box_mask_is_the_filled_boxes(pairs, nuclei, sam_weights):
    for folder in (pairs, nuclei):
        record, predictions = run(config(folder, sam_weights, "box_mask"))
        test = load_dataset(str(folder))["test"]
        assert record["method"]["uses_model"] is False
        for pred, mask in zip(predictions, test.labels, strict=True):
            assert np.array_equal(pred, fill_boxes(mask.shape, _boxes(mask)))
    record, predictions = run(config(nuclei, sam_weights, "box_mask", per="instance"))
    for pred, meta in zip(predictions, test.meta, strict=True):
        instances = [np.asarray(Image.open(f)) > 0 for f in meta["instances"]]
        boxes = [(1, [int(v) for v in naive_box(_pixels(m))]) for m in instances]
        assert np.array_equal(pred, fill_boxes(pred.shape, boxes))
    assert (
        record["metrics"]["test"]["dice"]
        > run(config(nuclei, sam_weights, "box_mask"))[0]["metrics"]["test"]["dice"]
    )  # the touching nuclei's component box covers background


def _pixels(region: np.ndarray) -> set:
    return set(zip(*(a.tolist() for a in np.nonzero(region)), strict=True))


def _boxes(mask: np.ndarray) -> list[tuple[int, list]]:
    return [(c, [int(v) for v in naive_box(p)]) for c, p in naive_components(mask)]


def test_instances_prompt_each_nucleus(nuclei, sam_weights):
    components = run(config(nuclei, sam_weights, "sam_box"))[0]["prompts"]
    instances, predictions = run(config(nuclei, sam_weights, "sam_box", per="instance"))
    assert components["prompts"] == 3 and instances["prompts"]["prompts"] == 4
    assert instances["prompts"]["per"] == "instance"
    assert "one prompt per instance" in instances["prompts"]["how"]
    assert [p.shape for p in predictions] == [(20, 22), (20, 22)]


def test_volumes_go_slice_by_slice_with_multiple_classes(volumes, sam_weights):
    test = load_dataset(str(volumes))["test"]
    record, predictions = run(config(volumes, sam_weights, "box_mask"))
    overlap = False
    for pred, mask in zip(predictions, test.labels, strict=True):
        expected = np.stack([fill_boxes(s.shape, _boxes(s)) for s in mask])
        assert np.array_equal(pred, expected)
        for s in mask:
            one = fill_boxes(s.shape, [b for b in _boxes(s) if b[0] == 1]) > 0
            two = fill_boxes(s.shape, [b for b in _boxes(s) if b[0] == 2]) > 0
            overlap |= bool((one & two).any())
    assert overlap  # the lower class took the shared pixels
    assert record["prompts"]["cases_without_foreground"] == 1
    assert record["prompts"]["volume_prompt"] == "slice"
    assert record["metrics"]["test"]["distance_unit"] == "mm"
    assert record["preprocessing"]["slices"]

    record, predictions = run(config(volumes, sam_weights, "sam_box_point", points=2, negatives=1))
    objects = sum(len(naive_components(s)) for m in test.labels for s in m)
    assert record["prompts"]["random"] and record["prompts"]["prompts"] == objects == 12
    assert [p.shape for p in predictions] == [m.shape for m in test.labels]
    assert not predictions[1].any()  # the empty volume
    assert set(np.unique(np.concatenate([p.ravel() for p in predictions]))) <= {0, 1, 2}


def test_classes_overlapping_take_the_higher_logit(volumes, sam_weights):
    """A slice with both classes: each class is the union of its prompts' masks, and where two
    classes claim a pixel the one with the higher SAM logit wins."""
    test = load_dataset(str(volumes))["test"]
    _, predictions = run(config(volumes, sam_weights, "sam_box"))
    model = load_sam(sam_weights)
    volume, mask, z = test.images[0], test.labels[0], 3
    x, frame = preprocess(volume[z], model.image_size)
    best = np.full((2, *mask.shape[1:]), -np.inf)
    with torch.no_grad():
        embedding = model.embed_image(x[None])
        for prompt in oracle_prompts(mask[z]):
            low = model.predict_masks(embedding, boxes=frame.boxes(prompt.box))
            logits = frame.logits(low)[0].numpy()
            best[prompt.label - 1] = np.maximum(best[prompt.label - 1], logits)
    expected = np.where(best.max(0) > 0, best.argmax(0) + 1, 0)
    assert {1, 2} <= set(np.unique(mask[z]))
    np.testing.assert_array_equal(predictions[0][z], expected)


def test_box3d_gives_each_object_one_box_over_its_slices(volumes, sam_weights):
    test = load_dataset(str(volumes))["test"]
    record, predictions = run(config(volumes, sam_weights, "box_mask", volume_prompt="box3d"))
    for pred, mask in zip(predictions, test.labels, strict=True):
        objects = naive_components(mask)  # connected in 3D
        zs = [range(min(p[0] for p in part), max(p[0] for p in part) + 1) for _, part in objects]
        boxes = [(c, [int(v) for v in naive_box(part)]) for c, part in objects]
        expected = fill_boxes(mask.shape, boxes, zs=[list(z) for z in zs])
        assert np.array_equal(pred, expected)
    sliced = run(config(volumes, sam_weights, "box_mask"))[1]
    assert not np.array_equal(predictions[0], sliced[0])  # the diagonal object's boxes differ
    assert record["prompts"]["volume_prompt"] == "box3d" and "3D box" in record["prompts"]["how"]
    sam3d, _ = run(config(volumes, sam_weights, "sam_box", volume_prompt="box3d"))
    assert sam3d["prompts"]["prompts"] == record["prompts"]["prompts"]


def test_seeds_matter_only_where_prompts_are_random(pairs, sam_weights):
    fixed = [run(config(pairs, sam_weights, "sam_box", seed=s))[1] for s in (0, 1)]
    assert all(np.array_equal(a, b) for a, b in zip(*fixed, strict=True))
    jittered = [run(config(pairs, sam_weights, "box_mask", jitter=4, seed=s)) for s in (0, 1)]
    assert jittered[0][0]["prompts"]["random"] and jittered[0][0]["prompts"]["jitter"] == 4
    assert not all(
        np.array_equal(a, b) for a, b in zip(jittered[0][1], jittered[1][1], strict=True)
    )


# --- bad input -------------------------------------------------------------------------------


def test_prompted_runs_refuse_what_they_cannot_do(pairs, volumes, sam_weights, tmp_path):
    started = time.perf_counter()
    cases = [
        (dict(backbone="resnet18"), "prompts a SAM model, but backbone 'resnet18'"),
        (dict(weights="none"), "needs a SAM checkpoint"),
        (dict(precision="bf16"), "runs the SAM model in fp32"),
        (dict(input_size=128), "takes its own input size"),
        (dict(train={"epochs": 2}), "segments from prompts without training"),
        (dict(resume=True), "segments from prompts without training"),
    ]
    for change, message in cases:
        cfg = config(pairs, sam_weights, "sam_box")
        for key, value in change.items():
            setattr(cfg, key, value)
        with pytest.raises(ConfigError, match=message):
            run_experiment(cfg, run_dir=tmp_path, progress=False)
    assert time.perf_counter() - started < 5  # refused before reading data or weights
    with pytest.raises(ConfigError, match="holds 2D images"):
        run(config(pairs, sam_weights, "sam_box", volume_prompt="box3d"))
    with pytest.raises(ConfigError, match="has no instance masks"):
        run(config(volumes, sam_weights, "sam_box", per="instance"))
    with pytest.raises(ConfigError, match="box3d draws boxes only"):
        run(config(volumes, sam_weights, "sam_point", volume_prompt="box3d"))
    with pytest.raises(ConfigError, match="per must be one of"):
        run(config(pairs, sam_weights, "sam_box", per="nucleus"))
    with pytest.raises(ConfigError, match="points must be at least 1"):
        run(config(pairs, sam_weights, "sam_point", points=0))
    with pytest.raises(ConfigError, match="segments images, but .* classification"):
        run(
            ExperimentConfig(
                dataset="synthetic-binary",
                backbone="litemedsam",
                weights=str(sam_weights),
                method="sam_box",
            )
        )
    with pytest.raises(ClinadaptError, match="does not exist"):
        run(config(pairs, tmp_path / "missing", "sam_box"))


# --- bench, report and command line ----------------------------------------------------------


def test_bench_report_and_cli_handle_prompted_runs(pairs, sam_weights, tmp_path, capsys):
    grid = GridConfig(
        datasets=[str(pairs)],
        backbones=["litemedsam"],
        weights=[str(sam_weights)],
        methods=["sam_box", "box_mask"],
        shots=["all"],
        seeds=1,
        base={"bootstrap": 10},
        method_options={"box_mask": {"jitter": 2}},
    )
    out = tmp_path / "bench"
    counts = run_grid(grid, out, progress=False)
    assert counts["done"] == 2 and counts["failed"] == 0
    records = read_records(out)
    assert {r["kind"] for r in records} == {"prompted"}
    for record in records:
        folder = Path(record["_path"]).with_suffix("")
        assert (folder / record["overlays"]["best"]).is_file()
    assert run_grid(grid, out, progress=False)["skipped"] == 2
    text = build_report(out)["markdown"].read_text()
    assert "box_mask, sam_box: zero-shot promptable segmentation with oracle prompts" in text

    record = tmp_path / "cli" / "sam_point.json"
    args = ["run", "--dataset", str(pairs), "--backbone", "litemedsam", "--weights"]
    args += [str(sam_weights), "--method", "sam_point", "--out", str(record), "--quiet"]
    assert main([*args, "method.points=2", "bootstrap=10"]) == 0
    assert "labelled images    0" in capsys.readouterr().out
    written = json.loads(record.read_text())
    assert written["kind"] == "prompted" and written["prompts"]["points"] == 2
    assert (record.with_suffix("") / written["overlays"]["worst"]).is_file()


# --- the real LiteMedSAM weights -------------------------------------------------------------


@pytest.mark.shared
def test_sam_box_with_litemedsam_on_kvasir_test_cases(tmp_path):
    """The first 10 Kvasir-SEG test cases with LiteMedSAM and a ground-truth box per polyp
    (connected component): a case with one polyp and one with several are the direct model's
    masks (PROVENANCE.md's path, masks merged), and the mean Dice is that of a model that works
    (0.915 on PROVENANCE.md's 25 images)."""
    kvasir = SHARED / "data" / "kvasir_seg"
    if not (LITEMEDSAM_DIR / "model.safetensors").is_file() or not (kvasir / "images").is_dir():
        pytest.skip(f"LiteMedSAM weights or Kvasir-SEG not found under {SHARED} (../shared absent)")
    split = load_dataset("kvasir_seg", root=str(SHARED / "data"))
    picked = {"test": split["test"].meta[:10], "train": split["train"].meta[:1]}
    picked["val"] = split["val"].meta[:1]
    folder = tmp_path / "kvasir10"
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir()
    rows = ["id,split"]
    for name, metas in picked.items():
        for meta in metas:
            for sub, key in (("images", "source"), ("masks", "mask")):
                (folder / sub / Path(meta[key]).name).symlink_to(meta[key])
            rows.append(f"{meta['id']},{name}")
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")

    record, predictions = run(config(folder, LITEMEDSAM_DIR, "sam_box"))
    assert record["backbone"]["verified"] and record["backbone"]["architecture"] == "litemedsam"
    assert record["metrics"]["test"]["n_cases"] == 10
    model = load_sam(LITEMEDSAM_DIR)
    test = load_dataset(str(folder))["test"]
    cases = record["metrics"]["test"]["cases"]
    counts = [len(oracle_prompts(m)) for m in test.labels]
    for i in (counts.index(1), next(i for i, n in enumerate(counts) if n > 1)):
        prompts = oracle_prompts(test.labels[i])  # one polyp; several (a box each, merged)
        x, frame = preprocess(test.images[i])
        boxes = frame.boxes(np.stack([p.box for p in prompts]))
        with torch.no_grad():
            logits = model.predict_masks(model.embed_image(x[None]), boxes=boxes)
        direct = frame.masks(logits).any(dim=0).numpy()
        assert np.array_equal(predictions[i] > 0, direct)
        truth = test.labels[i] > 0
        dice = 2 * (direct & truth).sum() / (direct.sum() + truth.sum())
        assert cases[i]["mean_fg_dice"] == pytest.approx(dice)
    dice, seconds = record["metrics"]["test"]["dice"], record["timings"]["seconds_per_case"]
    print(f"LiteMedSAM sam_box, first 10 Kvasir-SEG test cases: Dice {dice:.4f}, {seconds:.2f} s")
    assert dice > 0.85
