"""The same training code under DDP: two CPU processes (gloo) launched like `accelerate launch`
would (torchrun; `accelerate launch --cpu` needs MPI for several processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .ddp_script import tiny_model

SCRIPT = Path(__file__).with_name("ddp_script.py")


def test_two_processes_train_in_sync(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node", "2", str(SCRIPT), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    start = tiny_model().state_dict()
    # each process saw other batches and other augmentations: equal weights mean the
    # gradients were averaged across processes
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in start)
    assert not torch.equal(ranks[0]["head.weight"], start["head.weight"])
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["best_val"]["n"] == 24  # the validation split gathered once, no duplicates
    assert len(result["history"]) == 2
    assert (tmp_path / "history.json").is_file() and (tmp_path / "curves.png").is_file()
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["config"]["world_size"] == 2
    assert (tmp_path / "checkpoint" / "rng-1.pt").is_file()
