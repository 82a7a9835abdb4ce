import json
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
    assert "auc" in capsys.readouterr().out


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
