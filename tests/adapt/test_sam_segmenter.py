"""PromptedSegmenter: prompts drawn from a batch's targets, MedSAM's Dice + BCE loss against
MONAI's, class logits for validation, and the sam_decoder / sam_lora / sam_full methods (what
trains, LoRA merged back into a plain SAM)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backbones.test_sam import TINY_TINYVIT, randomized  # tests/ is on the path
from clinadapt.adapt import create_method
from clinadapt.adapt.sam_segmenter import (
    ABSENT,
    EmbeddingCache,
    PromptedSegmenter,
    PromptRecipe,
    dice_bce,
)
from clinadapt.backbones.sam import load_sam
from clinadapt.data.prompts import box_of
from clinadapt.errors import ConfigError
from data.test_prompts import naive_box, naive_components, pixel_set  # tests/data

pytestmark = pytest.mark.usefixtures("one_thread")


def _targets() -> torch.Tensor:
    """Three 64 px label maps: two class-1 squares and a class-2 bar; one object; nothing."""
    y = torch.zeros(3, 64, 64, dtype=torch.int64)
    y[0, 5:15, 5:20] = 1
    y[0, 40:50, 30:45] = 1
    y[0, 20:25, 50:62] = 2
    y[1, 10:40, 10:30] = 2
    return y


def _segmenter(recipe: PromptRecipe | None = None, k: int = 3) -> PromptedSegmenter:
    return PromptedSegmenter(randomized(TINY_TINYVIT), k, recipe or PromptRecipe())


def test_dice_bce_matches_monai_dice_plus_bce():
    monai = pytest.importorskip("monai")
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 16, 16, generator=gen) * 3
    masks = (torch.rand(4, 16, 16, generator=gen) > 0.6).float()
    dice = monai.losses.DiceLoss(sigmoid=True, squared_pred=True, reduction="mean")
    reference = dice(logits[:, None], masks[:, None]) + F.binary_cross_entropy_with_logits(
        logits, masks
    )
    assert torch.allclose(dice_bce(logits, masks), reference, atol=1e-6)


def test_validation_prompts_every_object_with_its_tight_box():
    segmenter = _segmenter().eval()
    y = _targets()
    batch = segmenter._prompts(y, None)
    assert batch.image == [0, 0, 0, 1]
    expected = []
    for i in range(2):
        for label, pixels in naive_components(y[i].numpy()):
            expected.append((i, label, tuple(naive_box(pixels)), frozenset(pixels)))
    got = [
        (i, lab, tuple(box.tolist()), frozenset(pixel_set(mask.numpy() > 0)))
        for i, lab, box, mask in zip(
            batch.image, batch.label, batch.boxes, batch.masks, strict=True
        )
    ]
    assert sorted(got, key=str) == sorted(expected, key=str)


def test_training_jitters_caps_and_repeats_under_a_seed():
    recipe = PromptRecipe(jitter=3, max_prompts=2)
    segmenter = _segmenter(recipe).train()
    y = _targets()
    first = segmenter._prompts(y, torch.Generator().manual_seed(5))
    again = segmenter._prompts(y, torch.Generator().manual_seed(5))
    other = segmenter._prompts(y, torch.Generator().manual_seed(6))
    assert first.image.count(0) == 2 and first.image.count(1) == 1  # 3 objects capped to 2
    assert torch.equal(first.boxes, again.boxes) and first.label == again.label
    assert not torch.equal(first.boxes, other.boxes)
    for n, box in enumerate(first.boxes.numpy()):  # jitter only grows the tight box, by <= 3
        tight = box_of(first.masks[n].numpy() > 0)
        assert np.all(box[:2] <= tight[:2]) and np.all(box[2:] >= tight[2:])
        assert np.all(tight[:2] - box[:2] <= 3) and np.all(box[2:] - tight[2:] <= 3)


def test_point_prompts_are_padded_with_non_points():
    recipe = PromptRecipe(prompt="box+points", points=2, negatives=1)
    segmenter = _segmenter(recipe).train()
    batch = segmenter._prompts(_targets(), torch.Generator().manual_seed(0))
    assert batch.points.shape == (4, 3, 2)
    assert set(batch.point_labels.unique().tolist()) <= {-1, 0, 1}
    assert (batch.point_labels[:, :2] == 1).all()


def test_class_logits_are_each_class_maximum_over_its_prompts():
    segmenter = _segmenter().eval()
    y = _targets()
    with torch.no_grad():
        out = segmenter(torch.rand(3, 3, 64, 64), y)
    assert out.logits.shape == (3, 3, 64, 64)
    assert (out.logits[:, 0] == 0).all()
    assert (out.logits[1, 1] == ABSENT).all() and (out.logits[2, 1:] == ABSENT).all()
    assert (out.logits[0, 1:] > ABSENT).any(dim=(1, 2)).all()
    assert torch.isfinite(out.loss)


def test_class_logits_equal_the_union_of_prompt_masks():
    segmenter = _segmenter().eval()
    y = _targets()[:1]
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        logits = segmenter(x, y).logits[0]
        batch = segmenter._prompts(y, None)
        masks = segmenter._decode(segmenter.sam.embed_image(x), [0], batch, (64, 64))
    for label in (1, 2):
        rows = [n for n, lab in enumerate(batch.label) if lab == label]
        assert torch.allclose(logits[label], masks[rows].max(dim=0).values.clamp_min(ABSENT))


def test_an_empty_batch_gives_a_zero_loss_that_backpropagates():
    segmenter = _segmenter().train()
    create_method("sam_decoder").apply(segmenter)
    out = segmenter(torch.rand(2, 3, 64, 64), torch.zeros(2, 64, 64, dtype=torch.int64))
    assert out.loss.item() == 0.0 and out.logits is None
    out.loss.backward()  # no error: the graph exists


def test_training_loss_falls_on_one_image():
    torch.manual_seed(0)
    segmenter = _segmenter(PromptRecipe(jitter=0)).train()
    create_method("sam_decoder").apply(segmenter)
    opt = torch.optim.AdamW([p for p in segmenter.parameters() if p.requires_grad], lr=1e-3)
    x, y = torch.rand(1, 3, 64, 64), _targets()[:1]
    losses = []
    for _ in range(15):
        loss = segmenter(x, y, generator=torch.Generator().manual_seed(0)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# --- methods ------------------------------------------------------------------------------


def _trainable(segmenter: PromptedSegmenter) -> set[str]:
    return {n.split(".")[1] for n, p in segmenter.named_parameters() if p.requires_grad}


def test_decoder_full_and_lora_train_what_they_say():
    decoder = create_method("sam_decoder").apply(_segmenter())
    assert _trainable(decoder) == {"mask_decoder"}
    full = create_method("sam_full").apply(_segmenter())
    assert _trainable(full) == {"image_encoder", "prompt_encoder", "mask_decoder"}
    method = create_method("sam_lora", {"r": 2})
    lora = method.apply(_segmenter())
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    encoder = [n for n in names if n.startswith("sam.image_encoder")]
    assert encoder and all("lora_" in n for n in encoder)
    assert all(t.endswith(("attn.qkv", "attn.proj")) for t in method.targets)
    assert len(method.targets) == 8  # qkv and proj of the 4 attention blocks of TINY_TINYVIT


def test_lora_merges_into_a_checkpoint_load_sam_reads(tmp_path):
    from safetensors.torch import save_file

    method = create_method("sam_lora", {"r": 2})
    segmenter = method.apply(_segmenter()).eval()
    with torch.no_grad():
        for name, p in segmenter.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    x = torch.rand(1, 3, 64, 64)
    boxes = torch.tensor([[4.0, 6.0, 40.0, 50.0]])
    merged = method.merge(segmenter)
    save_file(merged.state_dict(), str(tmp_path / "merged.safetensors"))
    config = {"image_encoder": {"img_size": 64}, "mask_decoder": {"transformer": {"num_heads": 2}}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "merged.safetensors").rename(tmp_path / "model.safetensors")
    reloaded = load_sam(tmp_path)
    with torch.no_grad():
        want = segmenter.sam.predict_masks(segmenter.sam.embed_image(x), boxes=boxes)
        got = reloaded.predict_masks(reloaded.embed_image(x), boxes=boxes)
        base = randomized(TINY_TINYVIT).eval()
        before = base.predict_masks(base.embed_image(x), boxes=boxes)
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(before, want, atol=1e-3)  # the LoRA update changed the model


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"prompt": "scribble"}, "prompt must be one of"),
        ({"prompt": "box+points", "volume_prompt": "box3d"}, "box3d draws boxes only"),
        ({"max_prompts": 0}, "max_prompts"),
        ({"per": "cell"}, "per must be one of"),
    ],
)
def test_bad_tuning_options_are_named(options, match):
    with pytest.raises(ConfigError, match=match):
        create_method("sam_decoder", options)


def test_a_frozen_encoder_embeds_each_image_once():
    segmenter = create_method("sam_decoder").apply(_segmenter()).eval()
    calls = []
    segmenter.sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    x, y = torch.rand(2, 3, 64, 64), _targets()[:2]
    with torch.no_grad():
        first = segmenter(x, y).logits
        again = segmenter(x.flip(0), y.flip(0)).logits.flip(0)
        segmenter(torch.cat([x[:1], torch.rand(1, 3, 64, 64)]), y)
    assert calls == [2, 1]  # the second batch is cached, the third has one new image
    assert torch.equal(first, again)
    full = create_method("sam_full").apply(_segmenter()).eval()
    full.sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    full(x, y), full(x, y)
    assert calls == [2, 1, 2, 2]  # a trained encoder is never cached
    empty = torch.zeros_like(y)
    empty[1] = y[1]
    full(x, empty)
    assert calls[-1] == 1  # an image without objects is not embedded at all


def test_the_embedding_cache_drops_the_least_recently_used():
    cache = EmbeddingCache(max_bytes=3 * 4 * 10)  # three tensors of 10 floats
    for i in range(3):
        cache.put(str(i), torch.full((10,), float(i)))
    cache.get("0")
    cache.put("3", torch.zeros(10))
    assert "1" not in cache and all(k in cache for k in ("0", "2", "3"))
    assert cache.bytes == 120
