"""What runs of vision-language methods add: class text and the backbone's text side, checked
before any work, given to the method, and described in the record's ``text`` block. An image
backbone's text side comes from a weights folder that ``clinadapt align`` wrote."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from clinadapt.errors import ConfigError


def needs_text(method: str) -> bool:
    from clinadapt.adapt import METHODS

    return bool(getattr(METHODS.get(method), "needs_text", False))


def check_text_options(cfg: Any) -> None:
    """Before any data is read: the class text of a registered dataset (the built-in record or
    ``class_text``) parses and names its classes, and the backbone can have a text side."""
    if not needs_text(cfg.method):
        return
    from clinadapt.adapt.vl import no_text_side
    from clinadapt.backbones import get_spec
    from clinadapt.data.class_text import class_text_for
    from clinadapt.data.registry import DATASETS
    from clinadapt.text.align import has_text_side

    if cfg.dataset in DATASETS:
        class_text_for(DATASETS.get(cfg.dataset), cfg.class_text)
    local = cfg.weights not in ("pretrained", "none")
    if get_spec(cfg.backbone).library != "open_clip" and not (local and has_text_side(cfg.weights)):
        raise no_text_side(cfg.method, cfg.backbone)


def attach_text(cfg: Any, method: Any, bundle: Any) -> dict[str, Any] | None:
    """Give a text method its class text and the backbone's text side; the record's ``text``
    block (None for other methods)."""
    if not getattr(type(method), "needs_text", False):
        return None
    from clinadapt.adapt.vl import no_text_side
    from clinadapt.data.class_text import class_text_for
    from clinadapt.text.align import has_text_side, load_text_side

    backbone = bundle.source.backbone if bundle.source is not None else None
    space = getattr(backbone, "text", None)
    if space is None and backbone is not None and has_text_side(cfg.weights):
        space = backbone.text = load_text_side(cfg.weights, backbone.feature_dim)
    if space is None:
        raise no_text_side(cfg.method, cfg.backbone)
    method.use_text(space, class_text_for(bundle.info, cfg.class_text))
    return method.text_block()


def resolve_class_text(cfg: Any, options: dict[str, Any]) -> None:
    """A run's identity holds its class-text file by absolute path and content hash (an edited
    file is a new run), and the text side of an aligned weights folder by content hash (a folder
    aligned again is a new run); runs without either keep their identity."""
    from clinadapt.text.align import has_text_side, text_side_files

    local = cfg.weights not in ("pretrained", "none")
    if needs_text(cfg.method) and local and has_text_side(cfg.weights):
        digest = hashlib.sha256()
        for file in text_side_files(cfg.weights):
            try:
                digest.update(file.read_bytes())
            except OSError as err:
                raise ConfigError(f"{file} cannot be read: {err}") from None
        options["text_side_sha256"] = digest.hexdigest()
    if cfg.class_text is None:
        options.pop("class_text", None)
        return
    file = Path(cfg.class_text).expanduser()
    try:
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
    except OSError as err:
        raise ConfigError(f"class_text {cfg.class_text!r} cannot be read: {err}") from None
    options["class_text"] = str(file.resolve())
    options["class_text_sha256"] = digest


def text_summary(block: dict[str, Any] | None) -> str:
    """One report cell: phrases, templates, text encoder and where the text came from."""
    if not block:
        return "-"
    encoder = block.get("space", {}).get("encoder", {}).get("name", "?")
    source = block.get("source", "?")
    source = source if source.startswith("built-in") else Path(source).name
    n = len(block.get("templates", []))
    return f"{block.get('use')} x {n} template{'' if n == 1 else 's'}; {encoder}; {source}"


def domain_rows(method: Any, bundle: Any) -> dict[str, Any]:
    """The domain of each example per split, for a method that uses domains (``dapl``); empty
    for other methods or when the data names no domain (the method then says what it needs)."""
    if not getattr(type(method), "uses_domains", False):
        return {}
    return dict(bundle.domains)
