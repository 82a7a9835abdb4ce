import json
import os
import subprocess
import sys

import pytest

from clinadapt.cli import main


def test_list_commands(capsys):
    assert main(["datasets", "*mnist3d"]) == 0
    out = capsys.readouterr().out
    assert "adrenalmnist3d" in out and "3D" in out and "breastmnist" not in out
    assert main(["backbones", "dino*"]) == 0
    assert "dinov2_vits14" in capsys.readouterr().out
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert all(m in out for m in ("knn", "prototype", "linear"))


def test_unknown_names_give_clean_errors(capsys):
    code = main(["run", "--dataset", "breastmnst", "--backbone", "test_cnn", "--weights", "none"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "breastmnist" in err and "Traceback" not in err


def test_run_with_options_and_overrides(tmp_path, capsys):
    out = tmp_path / "rec.json"
    code = main(
        [
            "run",
            "--dataset",
            "synthetic-binary",
            "--backbone",
            "test_cnn",
            "--weights",
            "none",
            "--quiet",
            "--out",
            str(out),
            "method=knn",
            "method.k=3",
            "shots=4",
            "bootstrap=20",
        ]
    )
    assert code == 0
    rec = json.loads(out.read_text())
    assert rec["method"]["config"]["k"] == 3
    assert rec["shots"]["support_size"] == 8
    printed = capsys.readouterr().out
    assert "auc" in printed and "labelled images    8 (8 train, 0 validation)" in printed


def test_run_prints_the_task_s_metrics(capsys, monkeypatch):
    from clinadapt.tasks import TASKS

    monkeypatch.setattr(TASKS.get("classification"), "printed_metrics", ("macro_f1", "auc"))
    options = ["--backbone", "test_cnn", "--weights", "none", "--quiet", "method=knn", "shots=4"]
    assert main(["run", "--dataset", "synthetic-binary", *options, "bootstrap=0"]) == 0
    metrics = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:3]]
    assert metrics == ["macro_f1", "auc"]


def test_run_from_yaml(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(
        "dataset: synthetic-multiclass\nbackbone: test_vit\nweights: none\nmethod: prototype\n"
        "shots: 3\nbootstrap: 0\n"
    )
    out = tmp_path / "rec.json"
    assert main(["run", "--config", str(cfg), "--quiet", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["config"]["backbone"] == "test_vit"


def test_unknown_override_key_is_an_error(capsys):
    assert main(["run", "--quiet", "shotz=5"]) == 2
    assert "Did you mean 'shots'" in capsys.readouterr().err


def test_pickle_weights_refused_without_trust(tmp_path, capsys):
    ckpt = tmp_path / "model.pth"
    ckpt.write_bytes(b"not really a pickle")
    code = main(
        [
            "run",
            "--dataset",
            "synthetic-binary",
            "--backbone",
            "test_cnn",
            "--weights",
            str(ckpt),
            "--quiet",
        ]
    )
    assert code == 2
    assert "trust-pickle" in capsys.readouterr().err.replace("_", "-")


def test_bench_and_report_end_to_end(tmp_path, capsys):
    out = tmp_path / "bench"
    args = [
        "bench",
        "--datasets",
        "synthetic-binary",
        "--backbones",
        "test_cnn",
        "--weights",
        "none",
        "--methods",
        "knn,prototype",
        "--shots",
        "2,all",
        "--seeds",
        "1",
        "--out",
        str(out),
        "--quiet",
        "bootstrap=20",
    ]
    assert main(args) == 0
    assert "4 runs done" in capsys.readouterr().out
    assert main(args) == 0
    assert "4 already done" in capsys.readouterr().out
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "report.html").exists()


@pytest.mark.parametrize("entry", [["-m", "clinadapt"]])
def test_module_entry_point(entry):
    proc = subprocess.run([sys.executable, *entry, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "bench" in proc.stdout


SYNTH = ["--dataset", "synthetic-binary", "--backbone", "test_cnn", "--weights", "none"]


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command reads data or loads a trained run: its error must come first."""
    import clinadapt.data
    import clinadapt.runner.predict

    def started(*args, **kwargs):
        raise AssertionError("the command started working before it checked its options")

    monkeypatch.setattr(clinadapt.data, "load_dataset", started)
    monkeypatch.setattr(clinadapt.runner.predict, "load_run", started)


def _subcommands() -> list[str]:
    import argparse

    from clinadapt.cli import build_parser

    parser = build_parser()
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sorted(actions[0].choices)


@pytest.mark.parametrize("command", _subcommands())
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "usage: clinadapt " + command in capsys.readouterr().out


def test_run_help_shows_percent_signs(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "95% CIs" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["run", "train", "bench", "pretrain"])
def test_overrides_may_stand_between_options(command):
    from clinadapt.cli import parse_args

    args = parse_args([command, "a=1", "--quiet", "b.c=2", "--out", "o", "d=3", "e=4"])
    assert args.overrides == ["a=1", "b.c=2", "d=3", "e=4"] and args.quiet and args.out == "o"


@pytest.mark.parametrize("argv", [["run", "--bogus"], ["run", "a=1", "--quiet", "--bogus"]])
def test_unknown_options_are_still_refused(argv, capsys):
    from clinadapt.cli import parse_args

    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and "--bogus" in capsys.readouterr().err


def test_run_with_overrides_between_options(tmp_path):
    out = tmp_path / "rec.json"
    argv = ["run", "method=knn", *SYNTH, "method.k=3", "--quiet", "shots=4", "--out", str(out)]
    assert main([*argv, "bootstrap=0"]) == 0
    assert json.loads(out.read_text())["method"]["config"]["k"] == 3


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", *SYNTH, "--seed", "-1"], "seed must not be negative, got -1"),
        (["run", *SYNTH, "--input-size", "0"], "input_size must be at least 1, got 0"),
        (["run", *SYNTH, "--bootstrap", "-5"], "bootstrap must not be negative, got -5"),
        (["run", *SYNTH, "--batch-size", "0"], "batch_size must be at least 1, got 0"),
        (["run", *SYNTH, "--max-slices", "0"], "max_slices must be at least 1, got 0"),
        (["run", *SYNTH, "shots=-2"], "shots must be a positive integer, 0 for zero-shot"),
        (["run", *SYNTH, "shots=0"], "shots=0: method 'linear' learns from labelled examples"),
        (["bench", "--datasets", "synthetic-binary", "--seeds", "0"], "seeds must be at least 1"),
        (["bench", "--datasets", "synthetic-binary", "batch_size=0"], "batch_size must be"),
    ],
)
def test_numeric_options_are_checked_before_any_work(argv, message, tmp_path, no_work, capsys):
    out = ["--out", str(tmp_path / ("bench" if argv[0] == "bench" else "rec.json"))]
    assert main([*argv, *out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_training_options_of_a_frozen_method_are_an_error(no_work, capsys):
    assert main(["run", *SYNTH, "method=knn", "train.epochs=5", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and "only apply to gradient-based methods" in err
    assert main(["run", *SYNTH, "method=linear", "--resume", "--quiet"]) == 2
    assert "--resume only applies to" in capsys.readouterr().err


def test_run_with_a_training_method_points_to_train(no_work, capsys):
    assert main(["run", *SYNTH, "method=lora", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "clinadapt train --out RUN_DIR" in err and "(--out)" not in err


def _under_a_file(tmp_path):
    blocker = tmp_path / "plain-file"
    blocker.write_text("")
    return blocker / "sub" / "target"


@pytest.mark.parametrize(
    "argv",
    [
        ["run", *SYNTH, "method=knn", "--out"],
        ["train", *SYNTH, "method=lora", "--out"],
        ["pretrain", "--data", "synthetic-binary", "--out"],
        ["bench", "--datasets", "synthetic-binary", "--out"],
        ["predict", "some-run", "image.png", "--out"],
        ["export", "some-run", "--out"],
        ["quickstart", "--out"],
        ["report", "some-runs", "--out"],
    ],
    ids=lambda argv: argv[0],
)
def test_output_under_a_file_is_refused_before_any_work(argv, tmp_path, no_work, capsys):
    assert main([*argv, str(_under_a_file(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "plain-file is a file, not a folder" in err and "Traceback" not in err


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders"
)
def test_output_in_a_read_only_folder_is_refused_before_any_work(tmp_path, no_work, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        assert main(["run", *SYNTH, "method=knn", "--out", str(locked / "rec.json")]) == 2
    finally:
        locked.chmod(0o755)
    assert f"{locked} is not writable" in capsys.readouterr().err


def test_run_refuses_to_replace_a_record_unless_forced(tmp_path, capsys):
    out = tmp_path / "rec.json"
    out.write_text("{}")
    argv = ["run", *SYNTH, "method=knn", "shots=4", "bootstrap=0", "--quiet", "--out", str(out)]
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err and out.read_text() == "{}"
    assert main([*argv, "--force"]) == 0
    assert json.loads(out.read_text())["config"]["method"] == "knn"


@pytest.mark.parametrize(
    "argv",
    [["train", *SYNTH, "method=lora"], ["pretrain", "--data", "synthetic-binary"]],
    ids=["train", "pretrain"],
)
def test_an_interrupted_run_is_not_restarted_without_resume(argv, tmp_path, no_work, capsys):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoint").mkdir(parents=True)
    (run_dir / "checkpoint" / "state.json").write_text(json.dumps({"epoch": 3}))
    assert main([*argv, "--quiet", "--out", str(run_dir)]) == 2
    assert (
        f"{run_dir} holds an interrupted run (epoch 3); add --resume to continue it or choose "
        "another --out" in capsys.readouterr().err
    )
    assert json.loads((run_dir / "checkpoint" / "state.json").read_text()) == {"epoch": 3}


@pytest.mark.parametrize(
    ("command", "pattern", "hint"),
    [
        ("datasets", "synth", "try 'synth*'"),
        ("backbones", "dino", "try 'dino*'"),
        ("methods", "nn", "try '*nn*'"),
        ("datasets", "zzz", ""),
    ],
)
def test_a_pattern_matching_nothing_is_an_error(command, pattern, hint, capsys):
    assert main([command, pattern]) == 2
    captured = capsys.readouterr()
    kind = {"datasets": "dataset", "backbones": "backbone", "methods": "method"}[command]
    assert f"no {kind} matches {pattern!r}" in captured.err and hint in captured.err
    assert captured.out == ""


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def test_training_writes_files_with_the_umask_mode(tmp_path, umask_027):
    run_dir = tmp_path / "run"
    argv = ["train", *SYNTH, "method=bitfit", "shots=4", "--out", str(run_dir), "--quiet"]
    assert main([*argv, "train.epochs=1", "train.batch_size=8", "bootstrap=0"]) == 0
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {"record.json", "adapter.safetensors", "adapter_config.json", "state.json"} <= {
        p.name for p in files
    }
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: oct(umask_027) for p in files
    }


def test_resume_with_nothing_to_resume_is_an_error(tmp_path, no_work, capsys):
    run_dir = tmp_path / "empty"
    assert main(["train", *SYNTH, "method=lora", "--resume", "--quiet", "--out", str(run_dir)]) == 2
    assert "holds no interrupted run" in capsys.readouterr().err


def test_bad_training_options_fail_before_any_work(tmp_path, no_work, capsys):
    argv = ["train", *SYNTH, "method=lora", "train.epochs=0", "--quiet", "--out", str(tmp_path)]
    assert main(argv) == 2
    assert "epochs must be at least 1" in capsys.readouterr().err


def test_bench_refuses_to_set_a_grid_axis_for_every_run(tmp_path, no_work, capsys):
    argv = ["bench", "--datasets", "synthetic-binary", "seed=2", "--out", str(tmp_path), "--quiet"]
    assert main(argv) == 2
    assert "--seeds" in capsys.readouterr().err


@pytest.fixture
def tiny_sam(tmp_path):
    """A tiny TinyViT SAM saved as a weights folder, as ../shared/weights/litemedsam."""
    from safetensors.torch import save_file

    from clinadapt.backbones.sam import PromptableSAM, SamArchitecture

    encoder = {
        "in_chans": 3,
        "embed_dims": (8, 16, 24, 32),
        "depths": (1, 1, 1, 1),
        "num_heads": (1, 1, 1, 1),
        "window_sizes": (7, 4, 4, 4),
        "mlp_ratio": 2.0,
        "mbconv_expand_ratio": 2.0,
        "out_chans": 16,
    }
    arch = SamArchitecture(
        "tiny", "tinyvit", encoder, image_size=64, embedding_size=8, prompt_dim=16,
        mask_in_chans=4, decoder_depth=1, decoder_mlp_dim=32, iou_head_hidden_dim=16,
    )  # fmt: skip
    folder = tmp_path / "weights"
    folder.mkdir()
    save_file(PromptableSAM(arch).state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"image_encoder": {"img_size": 64}}))
    return folder


def test_segment_draws_a_box_on_an_image(tmp_path, tiny_sam, capsys):
    import numpy as np
    from PIL import Image

    image = tmp_path / "scan.tif"
    Image.fromarray(np.arange(40 * 50, dtype=np.uint16).reshape(40, 50) * 20).save(image)
    out = tmp_path / "out"
    argv = ["segment", str(image), "--weights", str(tiny_sam), "--out", str(out), "--quiet"]
    assert main([*argv, "--box", "5,5,30,30", "--box", "20,10,45,35", "--point", "10,10,1"]) == 2
    assert "2 boxes and 1 group(s) of points" in capsys.readouterr().err
    assert not out.exists()
    assert main([*argv, "--box", "5,5,30,30", "--point", "10,10"]) == 0
    assert f"listed in {out / 'segment.csv'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["scan.png", "scan_overlay.png", "segment.csv"]
    with Image.open(out / "scan.png") as mask:
        assert mask.size == (50, 40) and mask.mode == "L"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "nothing to segment with: draw a box (--box x0,y0,x1,y1)"),
        (["--box", "1,1,5,5", "--prompts", "p.csv"], "not both"),
        (["--box", "1,1,5"], "--box '1,1,5': expected x0,y0,x1,y1 or x0,y0,z0,x1,y1,z1"),
        (["--point", "1,2,3,4"], "--point '1,2,3,4': expected x,y[,label] on an image"),
        (["--box", "1,1,5,5"], "--box and --point draw on one image or volume"),
        (["--prompts", "missing.csv"], "prompt file missing.csv does not exist"),
    ],
)
def test_segment_refuses_unusable_prompts_before_any_work(
    tmp_path, monkeypatch, capsys, extra, message
):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b.png"):
        Image.new("L", (8, 8)).save(name)
    inputs = ["a.png", "b.png"] if "draw on one" in message else ["a.png"]
    assert main(["segment", *inputs, "--out", "out", "--quiet", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def _bench_grid(argv: list[str]):
    from clinadapt.cli import _grid_from_args, build_parser

    return _grid_from_args(build_parser().parse_args(["bench", *argv]))


def test_bench_method_options_flag_is_a_grid_over_method_options():
    from clinadapt.runner.bench import expand

    argv = ["--datasets", "synthetic-binary", "--methods", "knn,prototype", "--shots", "1"]
    grid = _bench_grid([*argv, "--seeds", "1", "--method_options", "{knn: {k: [5, 20]}}"])
    assert grid.method_options == {"knn": {"k": [5, 20]}}
    runs = expand(grid)
    assert sorted({c.method_options["k"] for c in runs if c.method == "knn"}) == [5, 20]
    assert {c.method for c in runs if "k" not in c.method_options} == {"prototype"}
    # method.NAME.OPTION=VALUE adds to the flag's options of that method
    grid = _bench_grid([*argv, "--method_options", "{knn: {k: 5}}", "method.knn.temperature=0.1"])
    assert grid.method_options == {"knn": {"k": 5, "temperature": 0.1}}


def test_bench_option_flags_add_to_the_config_files_options(tmp_path):
    config = tmp_path / "grid.yaml"
    config.write_text(
        "methods: [knn, prototype]\nmethod_options: {knn: {k: 5, temperature: 0.2}}\n"
        "tta_options: {bn: {prior: 4}}\n"
    )
    flags = ["--method_options", "{knn: {k: 9}}", "--tta_options", "{tent: {lr: 0.01}}"]
    grid = _bench_grid(["--config", str(config), "--ttas", "bn,tent", *flags])
    assert grid.method_options == {"knn": {"k": 9, "temperature": 0.2}}
    assert grid.tta_options == {"bn": {"prior": 4}, "tent": {"lr": 0.01}}


@pytest.mark.parametrize("value", ["[1, 2]", "{knn: 5}", "{knn: {k: [5"])
def test_bench_method_options_flag_rejects_what_is_not_a_mapping(value, tmp_path, no_work, capsys):
    argv = ["bench", "--datasets", "synthetic-binary", "--method_options", value]
    assert main([*argv, "--out", str(tmp_path), "--quiet"]) == 2
    assert "--method_options" in capsys.readouterr().err
