"""Every registered pretraining method, end to end on tiny models: a loss that backpropagates
into the encoder, and the method-specific mechanics (teacher EMA, frozen prototypes, masking)."""

import pytest
import torch

from clinadapt.backbones import create_backbone
from clinadapt.errors import ConfigError, UnknownNameError
from clinadapt.ssl import SSL_METHODS, create_pretrain_model
from clinadapt.ssl.masking import random_mask
from clinadapt.ssl.views import ViewGenerator, resolve_views

SMALL = {
    "simclr": {"hidden_dim": 16, "out_dim": 8},
    "dino": {"out_dim": 32, "hidden_dim": 16, "bottleneck_dim": 8},
    "mae": {"decoder_dim": 16, "decoder_heads": 2, "decoder_depth": 1},
}
BACKBONES = {"simclr": "test_cnn", "dino": "test_cnn", "mae": "test_vit"}


def _model(method, backbone_name, **options):
    backbone = create_backbone(backbone_name, "none")
    encoder = backbone.model.train().requires_grad_(True)
    model = create_pretrain_model(
        method, encoder, backbone.feature_dim, {**SMALL[method], **options}
    )
    return backbone, model


def _views(model, x, seed=0):
    config = resolve_views(model.views, {"local_size": 16}, grayscale=True)
    return ViewGenerator(config, seed)(x)


@pytest.mark.parametrize("method", sorted(SSL_METHODS))
def test_every_method_gives_a_finite_loss_that_trains_the_encoder(method):
    torch.manual_seed(0)
    _, model = _model(method, BACKBONES[method])
    x = torch.randn(4, 3, 32, 32)
    loss = model(_views(model, x), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(
    ("method", "backbone"), [("simclr", "test_resnet3d"), ("mae", "test_vit3d")]
)
def test_volume_methods_run_on_native_3d_backbones(method, backbone):
    torch.manual_seed(0)
    _, model = _model(method, backbone)
    x = torch.randn(4, 1, 16, 16, 16)
    loss = model(_views(model, x), 0)
    loss.backward()
    assert torch.isfinite(loss)


def test_dino_teacher_follows_the_student_by_ema_and_prototypes_stay_frozen_first():
    torch.manual_seed(0)
    _, model = _model("dino", "test_cnn", momentum_teacher=0.5, freeze_last_layer_epochs=1)
    name, student = next((n, p) for n, p in model.encoder.named_parameters())
    teacher = dict(model.teacher.named_parameters())[name]
    assert torch.equal(student, teacher) and not teacher.requires_grad
    with torch.no_grad():
        student.add_(1.0)
    before = teacher.clone()
    model.after_optimizer_step(0.0)  # momentum 0.5 at the start of the cosine
    assert torch.allclose(teacher, 0.5 * before + 0.5 * student)
    model.after_optimizer_step(1.0)  # momentum 1 at the end: the teacher stops moving
    frozen = teacher.clone()
    model.after_optimizer_step(1.0)
    assert torch.equal(teacher, frozen)
    loss = model(_views(model, torch.randn(4, 3, 32, 32)), 0)
    loss.backward()
    model.before_optimizer_step(0)
    assert all(p.grad is None for p in model.head.last_layer_parameters())


def test_mae_encoder_sees_only_the_visible_patches():
    """Changing a hidden patch changes the reconstruction target, not the encoder's output."""
    torch.manual_seed(0)
    _, model = _model("mae", "test_vit", mask_ratio=0.5)  # 32 px, patch 16: 4 tokens
    x = torch.randn(2, 3, 32, 32)
    keep, mask = random_mask(2, 4, 0.5)
    hidden = int(mask[0].nonzero()[0])
    row, col = divmod(hidden, 2)
    changed = x.clone()
    changed[0, :, row * 16 : (row + 1) * 16, col * 16 : (col + 1) * 16] += torch.randn(3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model._encode(x, keep)[0], model._encode(changed, keep)[0])
        torch.manual_seed(1)
        loss = model([x], 0)
        torch.manual_seed(1)
        assert model([changed], 0) != loss
    with pytest.raises(ConfigError, match="do not match"):
        model([torch.randn(2, 3, 16, 16)], 0)


def test_mae_refuses_cnns_and_unknown_names_suggest():
    with pytest.raises(ConfigError, match="Vision Transformer"):
        _model("mae", "test_cnn")
    with pytest.raises(UnknownNameError, match="simclr"):
        create_pretrain_model("simclrr", torch.nn.Identity(), 4)
    with pytest.raises(ConfigError, match="temperatur"):
        _model("simclr", "test_cnn", temperatur=0.2)
