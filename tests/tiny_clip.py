"""A tiny random open_clip model built from a config dict, written in open_clip's local-folder
layout (``open_clip_config.json`` + ``open_clip_model.safetensors``): a vision-language backbone
for tests, without any download."""

from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PREPROCESS = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "interpolation": "bilinear"}


def write_tiny_clip(folder: Path, seed: int = 0, logit_scale: float = 10.0) -> Path:
    """The folder, holding a seeded random model whose ``logit_scale`` is ``logit_scale``."""
    import math

    import torch
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIP(**TINY_CLIP_CONFIG)
    model.logit_scale.data.fill_(math.log(logit_scale))
    config = {"model_cfg": TINY_CLIP_CONFIG, "preprocess_cfg": PREPROCESS}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder
