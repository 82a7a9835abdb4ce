"""Adapter-only checkpoints: what a fine-tuning method trained, plus how to rebuild the rest.

``save_adapter`` writes ``adapter.safetensors`` (``AdaptedModel.trainable_state_dict()``) and
``adapter_config.json`` (method name and config, backbone name, weights option, base weights id,
number of classes). ``load_adapted`` rebuilds the backbone with ``create_backbone``, applies the
method, loads the adapter strictly and checks the base weights are the ones it was trained on.
For ``full`` the "adapter" is the whole model state.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from clinadapt.adapt.base import METHODS
from clinadapt.adapt.finetune import AdaptedModel, FineTuneMethod
from clinadapt.config import from_dict, to_dict
from clinadapt.engine.checkpoint import save_safetensors
from clinadapt.errors import ClinadaptError

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
FORMAT_VERSION = 1


def method_name(method: FineTuneMethod) -> str:
    """The registered name of ``method``'s class."""
    for name in METHODS.names():
        if METHODS.get(name) is type(method):
            return name
    raise ClinadaptError(f"{type(method).__name__} is not a registered method")


def weights_option(model: AdaptedModel) -> str:
    """The ``weights`` argument that rebuilds the backbone: ``none``, ``pretrained`` or a path."""
    from clinadapt.backbones.registry import get_spec  # imports timm
    from clinadapt.backbones.weights import CONFIG_FILE, WEIGHTS_FILE

    backbone = model.backbone
    if not backbone.is_pretrained:
        return "none"
    if backbone.weights_id == get_spec(backbone.name).weights_ref:
        return "pretrained"
    source = Path(backbone.pretrained_cfg.source)
    if not source.exists():
        raise ClinadaptError(
            f"cannot tell which weights built backbone {backbone.name!r} (id "
            f"{backbone.weights_id}); pass weights='pretrained', 'none' or a path to save_adapter"
        )
    if source.name == WEIGHTS_FILE and (source.parent / CONFIG_FILE).is_file():
        source = source.parent  # the folder keeps its config.json (input size, kwargs)
    return str(source.resolve())


def save_adapter(
    model: AdaptedModel,
    method: FineTuneMethod,
    path_dir: str | Path,
    *,
    weights: str | None = None,
) -> Path:
    """Write ``adapter.safetensors`` and ``adapter_config.json`` into ``path_dir``; return it.

    ``weights`` is the option that rebuilds the base backbone; by default it is read from the
    backbone (``none``, ``pretrained`` or the local weights file it was built from).
    """
    if model.method_name is None:
        raise ClinadaptError("save_adapter needs a model that a fine-tuning method was applied to")
    name = method_name(method)
    if name != model.method_name:
        raise ClinadaptError(
            f"the model was adapted with {model.method_name!r}, not with {name!r}; pass its method"
        )
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in model.trainable_state_dict().items()}
    save_safetensors(state, path / ADAPTER_FILE, metadata={"format": "pt"})
    config: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "method": name,
        "method_config": to_dict(method.config),
        "backbone": model.backbone.name,
        "weights": weights if weights is not None else weights_option(model),
        "weights_id": model.backbone.weights_id,
        "num_classes": model.num_classes,
        "task": model.task,
        "head": model.head_kind,
        "trainable_parameters": model.trainable_parameters(),
        "base_parameters": model.base_parameters,
        "selected": method.selected(),
    }
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def read_adapter_config(path_dir: str | Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a saved adapter, checked for the keys loading needs."""
    file = Path(path_dir) / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ClinadaptError(
            f"{file} does not exist; point at a folder written by save_adapter"
        ) from None
    except json.JSONDecodeError as err:
        raise ClinadaptError(f"{file} is not valid JSON: {err}") from None
    missing = [
        k
        for k in ("method", "method_config", "backbone", "weights", "weights_id", "num_classes")
        if k not in config
    ]
    if missing:
        raise ClinadaptError(f"{file} lacks {missing}; it was not written by save_adapter")
    return config


def load_adapted(
    path_dir: str | Path,
    *,
    weights_override: str | None = None,
    trust_pickle: bool = False,
) -> tuple[AdaptedModel, FineTuneMethod]:
    """Rebuild the adapted model saved in ``path_dir`` (eval mode) and its method.

    ``weights_override`` replaces the saved weights option (e.g. the same weights at another
    path); the rebuilt base must still have the saved ``weights_id``.
    """
    from clinadapt.backbones.factory import create_backbone  # imports timm

    path = Path(path_dir)
    config = read_adapter_config(path)
    name = str(config["method"])
    cls = METHODS.get(name)
    if getattr(cls, "kind", None) != "finetune":
        raise ClinadaptError(f"{path / ADAPTER_CONFIG}: {name!r} is not a fine-tuning method")
    method = cls(from_dict(cls.config_cls, config["method_config"], where=f"method {name!r}"))
    weights = weights_override if weights_override is not None else str(config["weights"])
    backbone = create_backbone(str(config["backbone"]), weights, trust_pickle=trust_pickle)
    if backbone.weights_id != config["weights_id"]:
        raise ClinadaptError(
            f"{path / ADAPTER_CONFIG}: the adapter was trained on base weights "
            f"{config['weights_id']!r} but weights {weights!r} are {backbone.weights_id!r}; "
            "load the same base weights (weights_override=PATH)"
        )
    task = str(config.get("task", "classification"))  # adapters saved before tasks existed
    head = config.get("head")  # the task's default head when saved before heads had kinds
    model = method.apply(AdaptedModel(backbone, int(config["num_classes"]), task, head))
    file = path / ADAPTER_FILE
    try:
        state = load_file(str(file))
    except FileNotFoundError:
        raise ClinadaptError(f"{file} does not exist") from None
    except (SafetensorError, OSError) as err:
        raise ClinadaptError(f"{file} is not a readable safetensors file: {err}") from None
    _load_strict(model, state, file)
    return model.eval(), method


def _load_strict(model: AdaptedModel, state: dict[str, torch.Tensor], file: Path) -> None:
    expected = model.trainable_state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in file, {tuple(v.shape)} in model"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {_few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys {_few(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches {_few(shapes)}")
    if problems:
        raise ClinadaptError(
            f"{file} does not fit method {model.method_name!r} on backbone "
            f"{model.backbone.name!r}: {'; '.join(problems)}"
        )
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:  # cannot happen after the check above; be loud if it does
        raise ClinadaptError(f"{file}: unexpected keys {_few(result.unexpected_keys)}")


def _few(items: list[str], n: int = 5) -> str:
    return str(items[:n])[:-1] + (f", ... {len(items) - n} more]" if len(items) > n else "]")
