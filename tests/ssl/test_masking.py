import pytest
import torch

from clinadapt.ssl.masking import patchify, random_mask, unpatchify


@pytest.mark.parametrize("shape", [(2, 3, 8, 12), (2, 1, 4, 8, 8)])
def test_patchify_matches_naive_and_round_trips(shape):
    x = torch.randn(shape)
    p = 4
    patches = patchify(x, p)
    grid = [s // p for s in shape[2:]]
    cells = torch.cartesian_prod(*[torch.arange(g) for g in grid]).view(-1, len(grid))
    for i, index in enumerate(cells):
        box = tuple(slice(int(g) * p, (int(g) + 1) * p) for g in index)
        naive = x[(slice(None), slice(None), *box)]  # (B, C, p, p[, p])
        expected = naive.permute(0, *range(2, naive.ndim), 1).reshape(shape[0], -1)
        assert torch.equal(patches[:, i], expected)
    assert torch.equal(unpatchify(patches, p, shape[1], tuple(grid)), x)


def test_patch_order_is_the_vit_token_order():
    """A patch embedding (conv, kernel = stride = patch) of one patch is that patch's token."""
    x = torch.randn(1, 3, 8, 8)
    conv = torch.nn.Conv2d(3, 5, 4, stride=4)
    tokens = conv(x).flatten(2).transpose(1, 2)  # timm's order: (B, N, D)
    weight = conv.weight.permute(0, 2, 3, 1).reshape(5, -1)  # (D, p*p*C), pixels then channel
    assert torch.allclose(patchify(x, 4) @ weight.T + conv.bias, tokens, atol=1e-5)


def test_patchify_rejects_indivisible_sizes():
    with pytest.raises(ValueError, match="divisible"):
        patchify(torch.zeros(1, 1, 10, 10), 4)


def test_random_mask_hides_the_ratio_and_keeps_sorted_visible_tokens():
    torch.manual_seed(0)
    keep, mask = random_mask(6, 16, 0.75)
    assert keep.shape == (6, 4) and mask.shape == (6, 16)
    assert torch.all(mask.sum(1) == 12)
    assert torch.all(mask.gather(1, keep) == 0)
    assert torch.all(keep.diff(dim=1) > 0)
    assert len({tuple(k.tolist()) for k in keep}) > 1  # per-sample masks differ
    assert random_mask(1, 3, 0.99)[0].shape == (1, 1)  # at least one token stays visible
    with pytest.raises(ValueError, match="ratio"):
        random_mask(1, 4, 1.0)
