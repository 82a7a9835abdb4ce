"""Where clinadapt keeps files it derives (extracted arrays, checksums, features, hashes), and
the mode its files get."""

from __future__ import annotations

import os
from pathlib import Path


def cache_home() -> Path:
    """``$CLINADAPT_CACHE`` (``~`` expanded) or ``~/.cache/clinadapt``; not created here."""
    env = os.environ.get("CLINADAPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "clinadapt"


def share_like_new_file(path: str | Path) -> None:
    """Give a file written through a private temporary file (0600) the mode the umask gives any
    new file, so caches and run files are as readable as everything else the user writes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
