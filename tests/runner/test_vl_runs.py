"""Vision-language runs end to end through ``clinadapt run`` and ``clinadapt bench``, on a tiny
random open_clip model built from a config (no download) and a user's class-text file."""

from __future__ import annotations

import json

import pytest

from clinadapt.cli import main
from clinadapt.runner.bench import GridConfig, expand
from clinadapt.runner.experiment import ExperimentConfig
from clinadapt.runner.identity import run_id
from tiny_clip import write_tiny_clip

pytest.importorskip("open_clip")

CLASS_TEXT = """
templates: ["a synthetic image of {}.", "a toy picture showing {}."]
negative_templates: ["a synthetic image without {}."]
classes:
  class 0: {name: a dark square, description: a dark blob in the centre}
  class 1: {name: a bright square, description: a bright blob in the centre}
"""


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, one_thread):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny")


@pytest.fixture
def argv(tmp_path, clip_folder):
    text = tmp_path / "classes.yaml"
    text.write_text(CLASS_TEXT)
    base = ["--dataset", "synthetic-binary", "--backbone", "open_clip"]
    base += ["--weights", str(clip_folder), "--class-text", str(text)]
    return [*base, "--cache-dir", str(tmp_path / "cache"), "--bootstrap", "20", "--quiet"]


def run(args, out, capsys):
    code = main(["run", *args, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(out.read_text())


def test_zeroshot_run_uses_no_labels_and_records_its_text(argv, tmp_path, capsys):
    rec = run([*argv, "--method", "zeroshot", "--shots", "0"], tmp_path / "zs.json", capsys)
    assert rec["shots"]["requested"] == 0 and rec["shots"]["support_size"] == 0
    assert rec["labels_used"] == {"train": 0, "val": 0, "total": 0}
    assert "val" not in rec["metrics"]  # no validation labels drawn
    text = rec["text"]
    assert text["source"] == str((tmp_path / "classes.yaml").resolve()) and text["use"] == "names"
    assert text["classes"]["class 1"] == ["a bright square"]
    assert text["space"]["encoder"]["name"] == "open_clip text tower (tiny)"
    options = rec["run"]["options"]
    assert options["class_text"] == text["source"] and len(options["class_text_sha256"]) == 64
    assert 0 <= rec["metrics"]["test"]["auc"] <= 1 and rec["method"]["fitted_parameters"] == 0


def test_few_shot_text_methods_run_through_the_runner(argv, tmp_path, capsys):
    tip = run(
        [*argv, "--method", "tip_adapter", "--shots", "3", "method.search_step=[4,3]"],
        tmp_path / "tip.json",
        capsys,
    )
    assert tip["labels_used"] == {"train": 6, "val": 6, "total": 12}
    assert tip["method"]["selected"]["grid"] == [4, 3] and tip["text"]["use"] == "names"
    lzs = run(
        [*argv, "--method", "linear_zs", "--shots", "3", "method.epochs=3", "method.text=both"],
        tmp_path / "lzs.json",
        capsys,
    )
    assert lzs["labels_used"]["total"] == 6 and lzs["method"]["fitted_parameters"] == 2 * 16
    assert lzs["text"]["classes"]["class 0"] == ["a dark square", "a dark blob in the centre"]
    tipf = run(
        [*argv, "--method", "tip_adapter_f", "--shots", "2", "method.epochs=2"],
        tmp_path / "tipf.json",
        capsys,
    )
    assert tipf["method"]["fitted_parameters"] == 4 * 16


def test_multilabel_zeroshot_scores_each_label(tmp_path, clip_folder, capsys):
    text = tmp_path / "ml.yaml"
    text.write_text(CLASS_TEXT.replace("  class 1:", "  class 2: {name: noise}\n  class 1:"))
    args = ["--dataset", "synthetic-multilabel", "--backbone", "open_clip"]
    args += ["--weights", str(clip_folder), "--class-text", str(text), "--bootstrap", "0"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--quiet", "--method", "zeroshot"]
    rec = run([*args, "--shots", "0"], tmp_path / "ml.json", capsys)
    assert rec["text"]["negative_templates"] == ["a synthetic image without {}."]
    assert 0 <= rec["metrics"]["test"]["auc"] <= 1


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "zeroshot", "--shots", "5"], "run it with shots=0"),
        (["--method", "linear", "--shots", "0"], "only zero-shot methods (zeroshot)"),
        (["--method", "knn", "--shots", "2"], "method 'knn' uses no class text"),
        (["--method", "zeroshot", "--shots", "-1"], "shots must be a positive integer, 0"),
    ],
)
def test_bad_text_runs_fail_before_any_work(argv, extra, message, tmp_path, capsys):
    assert main(["run", *argv, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_text_side_or_class_text(tmp_path, clip_folder, capsys):
    image_only = ["--dataset", "breastmnist", "--backbone", "test_cnn", "--weights", "none"]
    assert main(["run", *image_only, "--method", "zeroshot", "--shots", "0", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "has no text side" in err and "clip_vitb16" in err and "clinadapt align" in err
    no_text = ["--dataset", "synthetic-binary", "--backbone", "open_clip"]
    no_text += ["--weights", str(clip_folder), "--method", "zeroshot", "--shots", "0"]
    no_text += ["--cache-dir", str(tmp_path / "cache"), "--quiet"]
    assert main(["run", *no_text]) == 2
    err = capsys.readouterr().err
    assert "no built-in class text" in err and "class_text=PATH" in err


def test_edited_class_text_is_a_new_run(argv, tmp_path):
    cfg = ExperimentConfig(
        dataset="synthetic-binary",
        backbone="open_clip",
        weights=str(tmp_path),
        method="zeroshot",
        shots="0",
        class_text=str(tmp_path / "classes.yaml"),
    )
    (tmp_path / "classes.yaml").write_text(CLASS_TEXT)
    before = run_id(cfg)
    (tmp_path / "classes.yaml").write_text(CLASS_TEXT.replace("dark square", "black square"))
    assert run_id(cfg) != before


def test_bench_pairs_zero_shots_with_zero_shot_methods(argv, tmp_path, capsys, clip_folder):
    grid = GridConfig(
        datasets=["synthetic-binary"],
        backbones=["open_clip"],
        weights=[str(clip_folder)],
        methods=["zeroshot", "tip_adapter", "knn"],
        shots=["0", "2"],
        seeds=1,
    )
    assert sorted((c.method, c.shots) for c in expand(grid)) == [
        ("knn", "2"),
        ("tip_adapter", "2"),
        ("zeroshot", "0"),
    ]
    with pytest.raises(Exception, match="have no shots to run at"):
        expand(GridConfig(methods=["zeroshot"], shots=["1", "5"]))
    with pytest.raises(Exception, match="shots 0 is only for zero-shot methods"):
        expand(GridConfig(methods=["knn"], shots=["0", "5"]))
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--datasets",
            "synthetic-binary",
            "--backbones",
            "open_clip",
            "--weights",
            str(clip_folder),
            "--methods",
            "zeroshot,tip_adapter,knn",
            "--shots",
            "0,2",
            "--seeds",
            "1",
            "--class-text",
            str(tmp_path / "classes.yaml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--bootstrap",
            "0",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    md = (out / "report" / "report.md").read_text()
    assert "| text |" in md and "names x 2 templates; open_clip text tower (tiny); classes" in md
    assert "shots 0 (zero-shot) use no labelled image" in md
    assert list((out / "report").glob("label_efficiency_*.png"))
