"""Optional packages are imported by the function that needs them, never when clinadapt is
imported; a missing one is a user-facing error that says what to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from clinadapt.errors import ClinadaptError


def require(module: str, *, extra: str | None, needed_by: str) -> ModuleType:
    """``module`` imported; else a ``ClinadaptError`` naming ``needed_by`` and the pip command:
    the clinadapt ``extra`` that installs the module, or the module itself when ``extra`` is None.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        install = f"pip install 'clinadapt[{extra}]'" if extra else f"pip install {module}"
        raise ClinadaptError(f"{needed_by} needs {module}: {install}") from None
