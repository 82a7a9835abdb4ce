"""open_clip backbones keep both towers: the image tower embeds, the text side (``JointSpace``)
encodes texts into the same space. A tiny random model built from a config dict stands in for
CLIP and BiomedCLIP; the hub paths are checked offline."""

from __future__ import annotations

import json
import socket

import huggingface_hub.constants as hf_constants
import pytest
import torch
from safetensors.torch import save_file

from clinadapt.backbones import create_backbone, get_spec, hub
from clinadapt.errors import ClinadaptError, ConfigError, UnknownNameError
from tiny_clip import TINY_CLIP_CONFIG, write_tiny_clip

pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny", logit_scale=20.0)


def test_local_folder_keeps_both_towers_in_one_space(folder, one_thread):
    import open_clip

    backbone = create_backbone("open_clip", str(folder))
    assert backbone.feature_dim == TINY_CLIP_CONFIG["embed_dim"]
    cfg = backbone.pretrained_cfg
    assert (cfg.input_size, cfg.mean, cfg.interpolation) == (32, (0.5,) * 3, "bilinear")
    space = backbone.text
    assert space.logit_scale == pytest.approx(20.0) and space.dim == 16
    reference = open_clip.create_model(f"local-dir:{folder}")  # open_clip's own loading
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    images = torch.randn(3, 3, 32, 32)
    texts = ["a chest X-ray showing pneumonia.", "a normal chest X-ray."]
    with torch.no_grad():
        torch.testing.assert_close(
            space.project_image(backbone.embed(images)),
            reference.encode_image(images, normalize=True),
        )
        torch.testing.assert_close(
            space.encode_text(texts),
            reference.encode_text(tokenizer(texts), normalize=True),
            atol=1e-5,
            rtol=1e-5,
        )
    # the text tower is no part of the backbone's parameters (it neither trains nor moves)
    assert sum(p.numel() for p in backbone.parameters()) == sum(
        p.numel() for p in reference.visual.parameters()
    )
    assert space.describe()["image_projection"] == "identity"
    assert space.describe()["encoder"]["weights_id"] == backbone.weights_id


def test_image_tower_only_weights_give_no_text_side(folder, tmp_path, one_thread):
    from safetensors.torch import load_file

    state = load_file(str(folder / "open_clip_model.safetensors"))
    visual = {k: v for k, v in state.items() if k.startswith("visual.")}
    arch = tmp_path / "arch"
    arch.mkdir()
    (arch / "tiny.json").write_text(json.dumps(TINY_CLIP_CONFIG))
    import open_clip

    open_clip.add_model_config(arch / "tiny.json")
    save_file(visual, str(tmp_path / "visual.safetensors"))
    backbone = create_backbone("open_clip:tiny", str(tmp_path / "visual.safetensors"))
    assert backbone.text is None and backbone.feature_dim == 16
    whole = create_backbone("open_clip:tiny", str(folder / "open_clip_model.safetensors"))
    assert whole.text is not None
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(backbone.embed(x), whole.embed(x))


def test_open_clip_names(monkeypatch):
    spec = get_spec("open_clip:ViT-B-16/openai")
    assert (spec.library, spec.model_name, spec.pretrained_tag) == (
        "open_clip",
        "ViT-B-16",
        "openai",
    )
    assert spec.weights_ref == "open_clip:ViT-B-16/openai"
    assert get_spec("clip_vitb16").weights_ref == "open_clip:ViT-B-16/openai"
    bio = get_spec("biomedclip")
    assert bio.weights_ref == (
        "open_clip:hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    )
    assert get_spec("open_clip:hf-hub:org/repo").model_name == "hf-hub:org/repo"
    with pytest.raises(UnknownNameError, match="ViT-B-16"):
        get_spec("open_clip:ViT-B-61/openai")
    with pytest.raises(UnknownNameError, match="no pretrained tag 'opnai'.*openai"):
        get_spec("open_clip:ViT-B-16/opnai")
    with pytest.raises(UnknownNameError, match="hf-hub:<org>/<repo>"):
        get_spec("open_clip:hf-hub:justarepo")


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)


def test_biomedclip_offline_names_the_download(no_network):
    with pytest.raises(ClinadaptError, match="no internet") as err:
        create_backbone("biomedclip")
    assert "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in str(err.value)


def test_local_folder_problems_are_named(tmp_path, folder):
    with pytest.raises(ConfigError, match="--weights FOLDER"):
        create_backbone("open_clip", "pretrained")
    with pytest.raises(ConfigError, match="--weights FOLDER"):
        create_backbone("open_clip", "none")
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": 4}}))
    with pytest.raises(ConfigError, match="vision_cfg"):
        create_backbone("open_clip", str(bare))
    (bare / "open_clip_config.json").write_text((folder / "open_clip_config.json").read_text())
    (bare / "open_clip_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ClinadaptError, match="convert the checkpoint to safetensors"):
        create_backbone("open_clip", str(bare))
    with pytest.raises(ConfigError, match="open_clip_config.json"):
        create_backbone("open_clip", str(folder / "open_clip_model.safetensors"))
