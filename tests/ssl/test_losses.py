"""Each loss against a deliberately naive re-implementation of the paper's formula."""

import math

import pytest
import torch

from clinadapt.ssl.losses import DINOLoss, masked_patch_mse, nt_xent


def naive_nt_xent(z_a: torch.Tensor, z_b: torch.Tensor, t: float) -> float:
    """SimCLR's equation (1), one anchor at a time, over all 2N anchors."""
    z = [v / v.norm() for v in torch.cat([z_a, z_b]).double()]
    n = len(z_a)
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        denominator = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / denominator)
    return total / (2 * n)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_matches_naive(t):
    g = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    assert nt_xent(z_a, z_b, t).item() == pytest.approx(naive_nt_xent(z_a, z_b, t), rel=1e-5)


def test_nt_xent_is_low_for_matching_views_and_checks_input():
    z = torch.eye(4)
    assert nt_xent(z, z, 0.1) < nt_xent(z, z.roll(1, 0), 0.1)
    with pytest.raises(ValueError, match="two"):
        nt_xent(torch.ones(3, 2), torch.ones(2, 2))
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(z, z, 0.0)


def naive_dino(student, teacher, center, t_s, t_t) -> float:
    """DINO's Algorithm 1: H(teacher_i, student_j) summed over pairs of different views."""
    total, pairs = 0.0, 0
    for i, t in enumerate(teacher):
        for j, s in enumerate(student):
            if i == j:
                continue
            for b in range(len(t)):
                p_t = torch.softmax((t[b].double() - center[0].double()) / t_t, 0)
                log_p_s = torch.log_softmax(s[b].double() / t_s, 0)
                total += -float((p_t * log_p_s).sum()) / len(t)
            pairs += 1
    return total / pairs


def test_dino_loss_matches_naive_and_updates_the_centre():
    g = torch.Generator().manual_seed(1)
    student = [torch.randn(3, 6, generator=g) for _ in range(4)]  # 2 global + 2 local
    teacher = [torch.randn(3, 6, generator=g) for _ in range(2)]
    loss = DINOLoss(6, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9)
    loss.center.copy_(torch.randn(1, 6, generator=g))
    before = loss.center.clone()
    expected = naive_dino(student, teacher, before, 0.1, 0.04)
    assert loss(student, teacher).item() == pytest.approx(expected, rel=1e-5)
    mean = torch.cat(teacher).mean(0, keepdim=True)
    assert torch.allclose(loss.center, 0.9 * before + 0.1 * mean, atol=1e-6)


def test_dino_teacher_temperature_warms_up_linearly():
    loss = DINOLoss(4, teacher_temp=0.07, warmup_teacher_temp=0.04, warmup_teacher_temp_epochs=3)
    temps = [loss.teacher_temperature(e) for e in range(5)]
    assert temps == pytest.approx([0.04, 0.05, 0.06, 0.07, 0.07])


def test_masked_patch_mse_matches_naive():
    g = torch.Generator().manual_seed(2)
    pred, patches = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 8, generator=g)
    mask = torch.tensor([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.float32)
    for normalise in (False, True):
        total, count = 0.0, 0
        for b in range(2):
            for n in range(5):
                if mask[b, n]:
                    target = patches[b, n].double()
                    if normalise:
                        target = (target - target.mean()) / (target.var() + 1e-6).sqrt()
                    total += float(((pred[b, n].double() - target) ** 2).mean())
                    count += 1
        got = masked_patch_mse(pred, patches, mask, normalise_target=normalise)
        assert got.item() == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match="shapes"):
        masked_patch_mse(pred, patches[:, :4], mask)
