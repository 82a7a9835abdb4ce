"""Frozen-feature runs under a multi-process launch: two CPU processes (gloo) started by
torchrun, as ``accelerate launch`` starts them. Each embeds half of every split, both get all the
features (equal to one process's), and only the first writes cache entries and records."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clinadapt.data.dataset import SPLITS
from clinadapt.runner.bench import run_grid
from clinadapt.runner.experiment import ExperimentConfig, prepare_features

from .distributed_script import OPTIONS, grid

SCRIPT = Path(__file__).with_name("distributed_script.py")


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("launch")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(SCRIPT), str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out


def test_each_process_embeds_its_share_and_gets_every_feature(launched, tmp_path, one_thread):
    single = prepare_features(ExperimentConfig(**OPTIONS, cache_dir=str(tmp_path)), progress=False)
    counts = [json.loads((launched / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = sum(len(single.labels[s]) for s in SPLITS)
    for rank, count in enumerate(counts):
        features = np.load(launched / f"rank{rank}.npz")
        for split in SPLITS:
            np.testing.assert_allclose(
                features[split], single.features[split], rtol=1e-5, atol=1e-6
            )
        assert not any(count["hits"].values())
        assert count["embedded"] <= total // 2 + 1 + 2 * 64  # half, and the precision probe
    assert counts[0]["saved"] >= len(SPLITS) and counts[1]["saved"] == 0


def test_a_bench_grid_writes_each_record_once_like_one_process(launched, tmp_path, one_thread):
    records = sorted((launched / "bench").rglob("*.json"))
    assert len(records) == 4
    assert not list((launched / "bench").rglob("*.lock"))
    run_grid(grid(str(tmp_path / "cache")), tmp_path / "bench", progress=False)
    for path in records:
        shared = json.loads(path.read_text())
        alone = json.loads((tmp_path / "bench" / path.relative_to(launched / "bench")).read_text())
        assert all(shared["feature_cache_hits"].values())  # the launch's cache, read once
        for metric in ("auc", "acc", "balanced_accuracy"):
            assert shared["metrics"]["test"][metric] == pytest.approx(
                alone["metrics"]["test"][metric], abs=1e-6
            )
