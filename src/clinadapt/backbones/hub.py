"""Hub downloads that fail fast and clearly on offline machines.

Offline, huggingface_hub retries for about 45 s before giving up. We probe the endpoint once
(3 s) and, when it is unreachable, switch the hub client to offline mode for the call so weights
already in the local hub cache still load and missing ones fail at once.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from typing import TypeVar
from urllib.parse import urlparse

from clinadapt.errors import ClinadaptError

T = TypeVar("T")
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub endpoint answers a TCP connect; behind a proxy assume it does."""
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    url = urlparse(_endpoint())
    try:
        with socket.create_connection((url.hostname or "", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    from huggingface_hub import constants

    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


def download(what: str, load: Callable[[], T]) -> T:
    """Run ``load`` (a timm/open_clip call fetching hub weights); fail with a clear message."""
    online = hub_reachable()
    try:
        with contextlib.nullcontext() if online else _offline():
            return load()
    except Exception as err:
        reason = (
            "no internet connection to the hub and they are not in the local hub cache"
            if not online
            else f"download or load failed: {err}"
        )
        raise ClinadaptError(
            f"cannot get pretrained weights {what}: {reason}. Pass --weights PATH (a "
            ".safetensors file or a folder with model.safetensors and config.json) or "
            "--weights none for a random-init control."
        ) from err
