"""Locked-text alignment (LiT: Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text
Tuning", CVPR; here the text side is the locked one, as the paper's "Lu" variant).

An image backbone gets a learned linear projection into a frozen text encoder's space, trained
so that each image lands near the text of its class: the pooled training images of one or more
datasets, each class described by its prompts (templates x names and/or descriptions). The loss
is LiT's symmetric contrastive loss with class text as captions: image to text is a softmax over
the text of every class of the pooled datasets (one prompt per class drawn at random each step,
so the projection learns the wording's meaning rather than one sentence); text to image, for each
class in the batch, is the probability that the softmax over the batch's images picks one of that
class's images (several images share a caption). The temperature is learned (CLIP's), capped at
100.

Classes of different datasets are one class only when their text is the same (the same set of
prompts): "normal" of a chest X-ray dataset and "normal" of a breast ultrasound dataset have
different templates, so they stay two classes and are each other's negatives.

The result is a weights folder: the backbone's weights and ``config.json`` as ``--weights``
takes them, plus ``text_side.json`` (which text encoder, its weights' sha256, the logit scale) and
``text_side.safetensors`` (the projection), read back by ``load_text_side``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clinadapt.backbones.text_side import JointSpace
from clinadapt.data.class_text import ClassText
from clinadapt.errors import ClinadaptError, ConfigError
from clinadapt.paths import share_like_new_file

TEXT_SIDE_FILE = "text_side.json"
PROJECTION_FILE = "text_side.safetensors"
FORMAT = 1
MAX_LOGIT_SCALE = 100.0


@dataclass(frozen=True)
class PooledClasses:
    """The classes of several datasets as one softmax. ``keys[c]`` names class c by its
    ``dataset:label`` members (joined by ``+`` when datasets share its text), ``prompts[c]`` its
    prompts, ``index[dataset][label]`` the pooled class of a dataset's label."""

    keys: tuple[str, ...]
    prompts: tuple[tuple[str, ...], ...]
    index: dict[str, np.ndarray]

    def describe(self) -> dict[str, Any]:
        return {
            "classes": len(self.keys),
            "keys": list(self.keys),
            "merged": [k for k in self.keys if "+" in k],
            "prompts_per_class": [len(p) for p in self.prompts],
        }


def pool_classes(texts: dict[str, ClassText], use: str) -> PooledClasses:
    """One pooled class per distinct prompt set, in dataset then label order."""
    members: list[list[str]] = []
    prompts: list[tuple[str, ...]] = []
    seen: dict[tuple[str, ...], int] = {}
    index: dict[str, np.ndarray] = {}
    for dataset, text in texts.items():
        rows = []
        for entry in text.classes:
            own = tuple(t.format(p) for p in text.phrases(entry, use) for t in text.templates)
            signature = tuple(sorted(set(own)))
            if signature not in seen:
                seen[signature] = len(prompts)
                prompts.append(own)
                members.append([])
            members[seen[signature]].append(f"{dataset}:{entry.label}")
            rows.append(seen[signature])
        index[dataset] = np.asarray(rows, dtype=np.int64)
    return PooledClasses(tuple("+".join(m) for m in members), tuple(prompts), index)


def contrastive_loss(
    z: torch.Tensor, text: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric loss of unit image embeddings ``z`` (B, d) against unit class texts (C, d):
    cross-entropy over the classes, and for each class present in the batch minus the log of
    the softmax mass (over the batch's images) on its own images."""
    logits = scale * z @ text.T  # (B, C)
    image_to_text = F.cross_entropy(logits, targets)
    present = targets.unique()
    own = targets[None, :] == present[:, None]  # (C', B)
    log_p = torch.log_softmax(logits[:, present].T, dim=1)
    text_to_image = -torch.logsumexp(log_p.masked_fill(~own, -math.inf), dim=1).mean()
    return (image_to_text + text_to_image) / 2


@dataclass(frozen=True)
class AlignSettings:
    epochs: int
    batch_size: int
    lr: float
    weight_decay: float
    logit_scale: float
    learn_scale: bool
    seed: int


class Projector(nn.Module):
    """Centred, scaled features -> linear map -> unit rows; ``folded`` gives one ``nn.Linear``
    on the raw features (the centring and scaling folded into its weights)."""

    def __init__(self, mean: torch.Tensor, spread: float, out_dim: int, scale: float) -> None:
        super().__init__()
        self.register_buffer("mean", mean.float())
        self.spread = float(spread)
        self.linear = nn.Linear(len(mean), out_dim)
        self.log_scale = nn.Parameter(torch.tensor(math.log(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.linear((x - self.mean) / self.spread), dim=-1)

    @property
    def scale(self) -> torch.Tensor:
        return self.log_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def folded(self) -> nn.Linear:
        out = nn.Linear(self.linear.in_features, self.linear.out_features)
        with torch.no_grad():
            out.weight.copy_(self.linear.weight / self.spread)
            out.bias.copy_(self.linear.bias - out.weight @ self.mean)
        return out.eval().requires_grad_(False)


def make_projector(features: torch.Tensor, out_dim: int, settings: AlignSettings) -> Projector:
    """A projector centred on ``features`` and scaled by their root-mean-square spread (one
    number, so that no feature's weight is blown up by a near-constant feature)."""
    mean = features.mean(dim=0)
    spread = float((features - mean).pow(2).mean().sqrt().clamp(min=1e-6))
    with torch.random.fork_rng():
        torch.manual_seed(settings.seed)
        projector = Projector(mean, spread, out_dim, settings.logit_scale)
    projector.log_scale.requires_grad_(settings.learn_scale)
    return projector


def train_projector(
    projector: Projector,
    batches: Callable[[torch.Generator], Any],
    bank: list[torch.Tensor],
    settings: AlignSettings,
    *,
    extra: list[nn.Parameter] | None = None,
    monitor: Callable[[], dict[str, float]] | None = None,
    progress: bool = True,
) -> list[dict[str, float]]:
    """Train ``projector`` (and ``extra`` parameters, e.g. LoRA) for ``settings.epochs``.

    ``batches(generator)`` yields (image features (B, D), pooled targets (B,)) for one epoch;
    ``bank[c]`` holds the unit embeddings of class c's prompts. Returns one row per epoch:
    mean loss, logit scale and what ``monitor`` measures."""
    from tqdm.auto import tqdm

    params = [p for p in projector.parameters() if p.requires_grad] + list(extra or [])
    optimiser = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    generator = torch.Generator().manual_seed(settings.seed)
    sizes = torch.tensor([len(b) for b in bank])
    history = []
    bar = tqdm(range(settings.epochs), desc="align", unit="epoch", disable=not progress)
    for epoch in bar:
        for group in optimiser.param_groups:  # cosine decay per epoch
            group["lr"] = 0.5 * settings.lr * (1 + math.cos(math.pi * epoch / settings.epochs))
        total, count = 0.0, 0
        for x, y in batches(generator):
            pick = (torch.rand(len(bank), generator=generator) * sizes).long()
            text = torch.stack([b[i] for b, i in zip(bank, pick.tolist(), strict=True)])
            loss = contrastive_loss(projector(x), text, y, projector.scale)
            if not torch.isfinite(loss):
                raise ClinadaptError(
                    f"align diverged at epoch {epoch + 1} (loss {float(loss.detach())}); lower lr"
                )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total, count = total + float(loss.detach()) * len(y), count + len(y)
        row = {"epoch": epoch + 1, "loss": total / max(count, 1)}
        row["logit_scale"] = float(projector.scale.detach())
        if monitor is not None:
            projector.eval()
            with torch.no_grad():
                row.update(monitor())
            projector.train()
        history.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}")
    return history


def prompt_bank(
    encode: Callable[[list[str]], torch.Tensor], pooled: PooledClasses
) -> list[torch.Tensor]:
    """Unit embeddings of every pooled class's prompts, encoded in one call."""
    flat = [p for prompts in pooled.prompts for p in prompts]
    embedded = encode(flat)
    out, start = [], 0
    for prompts in pooled.prompts:
        out.append(embedded[start : start + len(prompts)])
        start += len(prompts)
    return out


def save_text_side(
    folder: Path,
    projection: nn.Linear,
    logit_scale: float,
    encoder_name: str,
    encoder: Any,
    summary: dict[str, Any],
) -> None:
    """``text_side.json`` and ``text_side.safetensors`` in ``folder``."""
    from safetensors.torch import save_file

    state = {
        "weight": projection.weight.detach().contiguous(),
        "bias": projection.bias.detach().contiguous(),
    }
    tmp = folder / f".{PROJECTION_FILE}.tmp"
    save_file(state, str(tmp))
    share_like_new_file(tmp)
    tmp.replace(folder / PROJECTION_FILE)
    spec = {
        "format": FORMAT,
        "text_encoder": encoder_name,
        "text_encoder_weights_id": encoder.weights_id,
        "text_encoder_description": encoder.name,
        "dim": int(projection.out_features),
        "image_dim": int(projection.in_features),
        "logit_scale": float(logit_scale),
        "projection": PROJECTION_FILE,
        "aligned_on": summary,
    }
    tmp = folder / f".{TEXT_SIDE_FILE}.tmp"
    tmp.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    share_like_new_file(tmp)
    tmp.replace(folder / TEXT_SIDE_FILE)


def has_text_side(weights: str | Path) -> bool:
    """Whether a weights path is a folder that ``clinadapt align`` wrote."""
    return (Path(weights).expanduser() / TEXT_SIDE_FILE).is_file()


def text_side_files(weights: str | Path) -> list[Path]:
    """The files that make the text side (part of a run's identity)."""
    folder = Path(weights).expanduser()
    return [folder / TEXT_SIDE_FILE, folder / PROJECTION_FILE]


def load_text_side(weights: str | Path, image_dim: int) -> JointSpace:
    """The joint space of an aligned weights folder: its text encoder (checked to be the same
    weights it was aligned with) and projection."""
    from clinadapt.backbones.weights import read_state_dict
    from clinadapt.text.encoders import create_text_encoder

    folder = Path(weights).expanduser()
    file = folder / TEXT_SIDE_FILE
    try:
        spec = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{file} is not readable JSON ({err}); run clinadapt align again"
        ) from None
    needed = {"format", "text_encoder", "text_encoder_weights_id", "dim", "image_dim"}
    needed.add("logit_scale")
    if not isinstance(spec, dict) or not needed <= set(spec):
        raise ConfigError(f"{file} lacks {sorted(needed)}; run clinadapt align again")
    if spec["format"] != FORMAT:
        raise ConfigError(f"{file} has format {spec['format']}, this version reads {FORMAT}")
    if spec["image_dim"] != image_dim:
        raise ConfigError(
            f"{file}: the projection takes {spec['image_dim']} features, the backbone gives "
            f"{image_dim}; use the backbone it was aligned with"
        )
    encoder = create_text_encoder(spec["text_encoder"])
    if encoder.weights_id != spec["text_encoder_weights_id"]:
        raise ConfigError(
            f"{file}: aligned to text encoder {spec['text_encoder']!r} with weights "
            f"{spec['text_encoder_weights_id']}, but the installed one has {encoder.weights_id}; "
            "install the same version or run clinadapt align again"
        )
    state = read_state_dict(folder / PROJECTION_FILE)
    projection = nn.Linear(spec["image_dim"], spec["dim"])
    try:
        projection.load_state_dict(state)
    except RuntimeError as err:
        raise ConfigError(f"{folder / PROJECTION_FILE} does not fit {file}: {err}") from None
    return JointSpace(encoder, spec["logit_scale"], image_dim, projection=projection)
