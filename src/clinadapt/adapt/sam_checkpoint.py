"""Checkpoints of a trained promptable SAM: adapter-only (what the method trained, plus how to
rebuild the rest from the base checkpoint, whose sha256 must match) and merged (a complete
segment-anything checkpoint that ``load_sam`` and ``clinadapt segment --weights`` read as any
other).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import SafetensorError
from safetensors.torch import load_file

from clinadapt.adapt.base import METHODS
from clinadapt.config import from_dict, to_dict
from clinadapt.engine.checkpoint import save_safetensors, trainable_state
from clinadapt.errors import ClinadaptError

if TYPE_CHECKING:
    from clinadapt.adapt.prompted_tuning import SamTuning
    from clinadapt.adapt.sam_segmenter import PromptedSegmenter

ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def save_sam_adapter(
    segmenter: PromptedSegmenter, method: SamTuning, name: str, weights: str, path_dir: Path
) -> Path:
    """``adapter.safetensors`` (the trained tensors) and ``adapter_config.json`` in
    ``path_dir``; ``weights`` is the base checkpoint option (folder or file)."""
    path = Path(path_dir)
    path.mkdir(parents=True, exist_ok=True)
    trained = trained_keys(segmenter)
    state = {k: v for k, v in trainable_state(segmenter).items() if k in trained}
    save_safetensors(state, path / ADAPTER_FILE, metadata={"format": "pt"})
    info = segmenter.sam.checkpoint
    config = {
        "method": name,
        "method_config": to_dict(method.config),
        "weights": weights,
        "weights_sha256": info.sha256 if info else None,
        "num_classes": segmenter.num_classes,
        "trainable_parameters": sum(p.numel() for p in segmenter.parameters() if p.requires_grad),
        "selected": method.selected(),
    }
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return path


def trained_keys(segmenter: PromptedSegmenter) -> set[str]:
    """Trainable parameters, and buffers of modules that own one (e.g. batch-norm statistics of
    a fully fine-tuned encoder); frozen modules' buffers come from the base checkpoint."""
    params = dict(segmenter.named_parameters())
    owners = {
        name
        for name, module in segmenter.named_modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    }
    return {
        k
        for k in segmenter.state_dict()
        if (params[k].requires_grad if k in params else k.rpartition(".")[0] in owners)
    }


def load_sam_adapted(
    path_dir: str | Path, *, weights_override: str | None = None
) -> tuple[PromptedSegmenter, SamTuning]:
    """The trained segmenter saved in ``path_dir`` (eval mode) and its method."""
    from clinadapt.adapt.sam_segmenter import PromptedSegmenter
    from clinadapt.backbones.sam import load_sam

    path = Path(path_dir)
    file = path / ADAPTER_CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ClinadaptError(f"{file} does not exist; point at a trained prompted run") from None
    except json.JSONDecodeError as err:
        raise ClinadaptError(f"{file} is not valid JSON: {err}") from None
    name = str(config.get("method"))
    cls = METHODS.get(name)
    if not getattr(cls, "trains", False):
        raise ClinadaptError(f"{file}: {name!r} is not a trained prompted method")
    method = cls(from_dict(cls.config_cls, config["method_config"], where=f"method {name!r}"))
    weights = weights_override or str(config["weights"])
    sam = load_sam(weights)
    found = sam.checkpoint.sha256 if sam.checkpoint else None
    if config.get("weights_sha256") and found != config["weights_sha256"]:
        raise ClinadaptError(
            f"{file}: the adapter was trained on base weights with sha256 "
            f"{config['weights_sha256'][:16]}..., but {weights} has {str(found)[:16]}...; pass "
            "the same base checkpoint (weights_override=PATH)"
        )
    segmenter = method.apply(
        PromptedSegmenter(sam, int(config["num_classes"]), method.config.recipe())
    )
    adapter = path / ADAPTER_FILE
    try:
        state = load_file(str(adapter))
    except (FileNotFoundError, SafetensorError, OSError) as err:
        raise ClinadaptError(f"{adapter} is not a readable safetensors file: {err}") from None
    expected = trained_keys(segmenter)
    if set(state) != expected:
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        raise ClinadaptError(
            f"{adapter} does not fit method {name!r}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}"
        )
    segmenter.load_state_dict(state, strict=False)
    return segmenter.eval(), method


def export_merged(
    segmenter: PromptedSegmenter, method: SamTuning, weights: str, out: Path
) -> dict[str, Any]:
    """``model.safetensors`` in segment-anything layout (and the base folder's ``config.json``,
    which holds the sizes the shapes do not show) in ``out``."""
    sam = method.merge(segmenter)
    state = {k: v.detach().cpu().contiguous() for k, v in sam.state_dict().items()}
    save_safetensors(state, out / "model.safetensors")
    base = Path(weights)
    config = base / "config.json" if base.is_dir() else base.with_name("config.json")
    if config.is_file():
        shutil.copy2(config, out / "config.json")
    return {"tensors": len(state), "parameters": sum(v.numel() for v in state.values())}
