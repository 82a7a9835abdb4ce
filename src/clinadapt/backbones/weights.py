"""Local weights: safe reading (safetensors; pickle only when trusted), strict loading, hashing."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from clinadapt.backbones.base import PretrainedConfig
from clinadapt.errors import ClinadaptError, ConfigError, UnsafeCheckpointError
from clinadapt.paths import cache_home, share_like_new_file

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class LocalWeights:
    """A weights file plus the optional ``config.json`` that says how to build and feed it."""

    file: Path
    config: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def config_file(self) -> Path:
        return self.file.parent / CONFIG_FILE

    @property
    def architecture(self) -> str | None:
        arch = self.config.get("architecture")
        return str(arch).split(".", 1)[0] if arch else None

    @property
    def create_kwargs(self) -> dict[str, Any]:
        """Constructor kwargs: ``create_model_kwargs`` (ours) or ``model_args`` (timm hub repos)."""
        return dict(self.config.get("create_model_kwargs") or self.config.get("model_args") or {})

    def rejected_kwargs(self, arch: str, err: Exception) -> ConfigError:
        """The error to raise when building ``arch`` with ``create_kwargs`` failed."""
        key = "create_model_kwargs" if self.config.get("create_model_kwargs") else "model_args"
        return ConfigError(
            f"{self.config_file}: {key} {self.create_kwargs} are not accepted by {arch} ({err}); "
            "fix or remove them"
        )

    def override(self, cfg: PretrainedConfig) -> PretrainedConfig:
        """The library's config with this folder's input size, mean/std and interpolation."""
        src = {**(self.config.get("pretrained_cfg") or {}), **self.config}
        changes: dict[str, Any] = {"source": str(self.file)}
        if "input_size" in src:
            size = src["input_size"]
            changes["input_size"] = int(size) if isinstance(size, int) else int(size[-1])
        for key in ("mean", "std"):
            if key in src:
                changes[key] = tuple(float(v) for v in src[key])
        if "interpolation" in src:
            changes["interpolation"] = str(src["interpolation"])
        return replace(cfg, **changes)


def resolve_local_weights(path: Path) -> LocalWeights:
    """A safetensors or pickle file, or a folder with ``model.safetensors`` and ``config.json``."""
    if not path.exists():
        raise ClinadaptError(
            f"weights {str(path)!r} do not exist; use 'pretrained', 'none', a .safetensors file "
            f"or a folder with {WEIGHTS_FILE} and {CONFIG_FILE}"
        )
    if path.is_dir():
        file = path / WEIGHTS_FILE
        if not file.is_file():
            found = sorted(p.name for p in path.iterdir())[:10]
            raise ClinadaptError(f"weights folder {path} has no {WEIGHTS_FILE} (it holds {found})")
        return LocalWeights(file, _read_config(path / CONFIG_FILE))
    if path.suffix not in (".safetensors", *PICKLE_SUFFIXES):
        raise ClinadaptError(
            f"weights file {path} is neither .safetensors nor a pickle checkpoint "
            f"({', '.join(PICKLE_SUFFIXES)})"
        )
    # a file next to our config.json (e.g. model_1000cls.safetensors) is built the same way
    sibling = _read_config(path.parent / CONFIG_FILE)
    return LocalWeights(path, sibling if "architecture" in sibling else {})


def _read_config(path: Path) -> dict[str, Any]:
    """A weights folder's config.json, or {} when there is none."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ClinadaptError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    _check_config(data, path)
    return data


def _check_config(config: dict[str, Any], path: Path) -> None:
    """Wrong types fail here, naming the file and key, instead of as a traceback when used."""

    def fail(key: str, value: Any, expected: str) -> ConfigError:
        return ConfigError(f"{path}: {key} must be {expected}, got {value!r}; fix or remove it")

    arch = config.get("architecture")
    if arch is not None and not isinstance(arch, str):
        raise fail("architecture", arch, "a model name such as 'vit_small_patch16_224'")
    for key in ("create_model_kwargs", "model_args", "pretrained_cfg"):
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise fail(key, config[key], "a JSON object of names and values")
    for prefix, part in (("", config), ("pretrained_cfg.", config.get("pretrained_cfg") or {})):
        if "input_size" in part and not _sizes(part["input_size"]):
            expected = "a positive integer or a list like [3, 224, 224]"
            raise fail(prefix + "input_size", part["input_size"], expected)
        for key in ("mean", "std"):
            if key in part and not _channel_values(part[key], positive=key == "std"):
                expected = f"a list of 1 or 3 {'positive ' if key == 'std' else ''}numbers"
                raise fail(prefix + key, part[key], expected)
        if "interpolation" in part and not isinstance(part["interpolation"], str):
            expected = "a name such as 'bilinear' or 'bicubic'"
            raise fail(prefix + "interpolation", part["interpolation"], expected)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _sizes(value: Any) -> bool:
    values = value if isinstance(value, list) else [value]
    return bool(values) and all(_is_int(v) and v > 0 for v in values)


def _channel_values(value: Any, *, positive: bool) -> bool:
    if not isinstance(value, list) or len(value) not in (1, 3):
        return False
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    return numbers and all(math.isfinite(v) and (v > 0 or not positive) for v in value)


def read_state_dict(file: Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors from a safetensors file; pickle checkpoints only when the user trusts the file."""
    if file.suffix in PICKLE_SUFFIXES:
        if not trust_pickle:
            raise UnsafeCheckpointError(
                f"{file} is a pickle checkpoint, which can run arbitrary code when loaded. "
                "Convert it to .safetensors, or pass --trust-pickle if you trust its source."
            )
        try:
            obj = torch.load(file, map_location="cpu", weights_only=False)
        except Exception as err:
            raise ClinadaptError(f"cannot read pickle checkpoint {file}: {err}") from None
        return _unwrap(obj, file)
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except Exception as err:
        raise ClinadaptError(
            f"{file} is not a readable safetensors file ({err}); it may be truncated or "
            "corrupt: download or export it again"
        ) from None


def _unwrap(obj: Any, file: Path) -> dict[str, torch.Tensor]:
    """The state dict inside common checkpoint layouts (Lightning, DDP, whole modules)."""
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping | nn.Module):
            return _unwrap(obj[key], file)
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ClinadaptError(f"{file} does not hold a state dict of tensors")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return dict(obj)


def load_checked(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    file: Path,
    *,
    arch: str,
    drop_prefixes: tuple[str, ...] = (),
) -> None:
    """Load strictly (classifier keys aside); on mismatch, try timm's converter, else explain.

    timm's ``checkpoint_filter_fn`` turns original-format checkpoints into timm's and resamples
    position embeddings (DINOv2 hub files are 518 px; we run at 224).
    """
    state = _drop(state, drop_prefixes)
    problems = _mismatches(model, state)
    if problems:
        converter = _timm_converter(model)
        if converter is not None:
            try:
                converted = _drop(converter(dict(state), model), drop_prefixes)
            except Exception:
                converted = None
            if converted is not None and not _mismatches(model, converted):
                state, problems = converted, []
    if problems:
        raise ClinadaptError(f"weights {file} do not fit {arch}: {'; '.join(problems)}")
    model.load_state_dict(state, strict=True)


def _drop(state: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {
        k: v for k, v in state.items() if not any(k == p or k.startswith(p + ".") for p in prefixes)
    }


def _mismatches(model: nn.Module, state: Mapping[str, torch.Tensor], limit: int = 5) -> list[str]:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    out = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            out.append(f"{len(items)} {label}: {', '.join(items[:limit])}{more}")
    return out


def _timm_converter(model: nn.Module) -> Callable[..., dict[str, torch.Tensor]] | None:
    module = sys.modules.get(type(model).__module__)
    fn = getattr(module, "checkpoint_filter_fn", None)
    return fn if callable(fn) and type(model).__module__.startswith("timm.") else None


def file_sha256(file: Path) -> str:
    """sha256 of a weights file, remembered per (path, size, mtime) so big files hash once."""
    stat = file.stat()
    ident = {"path": str(file.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = cache_home() / "hashes" / f"{hashlib.sha256(ident['path'].encode()).hexdigest()}.json"
    try:
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in ident} == ident and isinstance(saved.get("sha256"), str):
            return saved["sha256"]
    except (OSError, ValueError):
        pass
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    sha = digest.hexdigest()
    try:  # the memo is an optimisation: a read-only cache folder is not an error
        memo.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=memo.parent, delete=False) as tmp:
            json.dump({**ident, "sha256": sha}, tmp)
        share_like_new_file(tmp.name)
        os.replace(tmp.name, memo)
    except OSError:
        pass
    return sha
