"""Hub weights offline: a fast, clear error, and never a network attempt in tests."""

from __future__ import annotations

import socket

import huggingface_hub.constants as hf_constants
import pytest

from clinadapt.backbones import create_backbone, hub
from clinadapt.errors import ClinadaptError


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Any socket connection fails the test; the hub cache is empty."""

    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: False)


@pytest.mark.parametrize("name", ["test_vit", "clip_vitb16"])
def test_pretrained_offline_suggests_weights_path_or_none(no_network, name):
    before = hf_constants.HF_HUB_OFFLINE
    with pytest.raises(ClinadaptError, match="no internet") as err:
        create_backbone(name, weights="pretrained")
    assert "--weights PATH" in str(err.value) and "--weights none" in str(err.value)
    assert before == hf_constants.HF_HUB_OFFLINE  # offline mode is only for the call


def test_download_failure_online_names_the_cause(monkeypatch):
    monkeypatch.setattr(hub, "hub_reachable", lambda timeout=3.0: True)

    def fail():
        raise OSError("HTTP 404 for timm/some-model")

    with pytest.raises(ClinadaptError, match="HTTP 404"):
        hub.download("timm:some-model", fail)


def test_unreachable_endpoint_is_detected_without_waiting(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "ENDPOINT", "https://127.0.0.1:9")  # discard port: closed
    assert hub.hub_reachable(timeout=1.0) is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub.hub_reachable() is True  # behind a proxy the hub client decides
