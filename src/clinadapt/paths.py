"""Where clinadapt keeps files it derives (extracted arrays, checksums, features, hashes)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """``$CLINADAPT_CACHE`` (``~`` expanded) or ``~/.cache/clinadapt``; not created here."""
    env = os.environ.get("CLINADAPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clinadapt"
