"""Training speed reporting (images/s and FLOP/s), loss checks without per-step host syncs,
and the torch.compile option."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clinadapt.engine import loop as loop_module
from clinadapt.engine.flops import counting_flops, throughput
from clinadapt.errors import ClinadaptError

from .ddp_script import run, tiny_data, tiny_model

DATA = tiny_data(n_train=24, n_val=8)


def fit(model, out_dir, **options):
    return run(model, DATA, out_dir, batch_size=8, **options)


def test_flops_of_a_training_step_are_counted_by_hand(tmp_path):
    # TinyNet: Conv2d(3, 8, 3, stride 2) on 16 px -> 8 x 8 outputs, then Linear(8, 2).
    conv = 2 * (8 * 8) * 8 * (3 * 3 * 3)  # per image, forward
    head = 2 * 8 * 2
    # backward: the convolution's weight gradient only (the images need none), the head's
    # weight and input gradients
    expected = 2 * conv + 3 * head
    result = fit(tiny_model(), tmp_path)
    speed = result.throughput
    assert speed["flops_per_example"] == expected
    assert speed["examples_per_s"] > 0
    assert speed["tflop_per_s"] == pytest.approx(speed["examples_per_s"] * expected / 1e12)
    assert [row["examples"] for row in result.history] == [24, 24]
    assert all(0 < row["train_seconds"] <= row["seconds"] for row in result.history)


def test_counting_flops_and_throughput():
    with counting_flops() as count:
        torch.ones(4, 3) @ torch.ones(3, 5)
    assert count.total == 2 * 4 * 3 * 5
    assert throughput(10, 2.0, 1e12) == {
        "examples_per_s": 5.0,
        "flops_per_example": 1e12,
        "tflop_per_s": 5.0,
    }
    assert throughput(10, 2.0, None)["tflop_per_s"] is None


class NanAtCall(nn.Module):
    """TinyNet whose training forward returns NaN logits at one call."""

    def __init__(self, bad_call: int) -> None:
        super().__init__()
        self.net, self.bad_call, self.calls = tiny_model(), bad_call, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls == self.bad_call:
                return out * float("nan")
        return out


@pytest.mark.parametrize("sync_every", [1, 2, 20])
def test_a_diverging_step_is_named_exactly_however_rarely_the_host_looks(
    tmp_path, monkeypatch, sync_every
):
    monkeypatch.setattr(loop_module, "SYNC_EVERY", sync_every)
    # 3 steps per epoch: the 5th call is epoch 2, step 2
    with pytest.raises(ClinadaptError, match=r"epoch 2, step 2\b"):
        fit(NanAtCall(bad_call=5), tmp_path, epochs=3)


def test_compile_option_trains_through_torch_compile_and_keeps_the_run_identity(
    tmp_path, monkeypatch
):
    compiled = []
    real_compile = torch.compile

    def spy(model, **kwargs):
        compiled.append(type(model).__name__)
        return real_compile(model, backend="aot_eager")  # no C++ toolchain needed

    monkeypatch.setattr(torch, "compile", spy)
    plain = fit(tiny_model(), tmp_path / "plain")
    model = tiny_model()
    fast = fit(model, tmp_path / "compiled", compile=True)
    assert compiled == ["TinyNet"]
    for a, b in zip(plain.history, fast.history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
    assert fast.throughput["flops_per_example"] is None  # the counter cannot see fused kernels
    # a compiled run resumes an uncompiled one: compile is not part of the checkpoint's config
    again = fit(tiny_model(), tmp_path / "plain", resume=True, compile=True)
    assert again.history == plain.history
    # under bf16 autocast too (accelerate wraps the forward, and must unwrap the plain model)
    mixed = tiny_model()
    fit(mixed, tmp_path / "bf16", compile=True, precision="bf16")
    assert mixed(torch.zeros(2, 3, 16, 16)).dtype == torch.float32
