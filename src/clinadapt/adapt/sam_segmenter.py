"""A promptable SAM that trains on label maps: its prompts come from the targets of each batch,
as MedSAM is fine-tuned (Ma et al. 2024, "Segment anything in medical images", Nat. Commun.):
one box (and/or points) per object drawn from the ground truth, one mask per prompt, Dice + BCE
per prompt against that object's mask.

The training loop calls ``segmenter(images, targets, generator=...)`` instead of ``model(images)``
(``draws_prompts``): images are in the SAM encoder's frame (``SamPairs``), targets the label maps
brought to that frame with them. The output carries the loss (mean over the batch's prompts) and,
out of training mode, the (B, K, H, W) class logits the segmentation task validates: background 0,
each class the maximum of its prompts' mask logits (the union of its objects, as prompted test
cases are combined), ``ABSENT`` where a class has no prompt in the image.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clinadapt.data.prompts import object_prompt, objects
from clinadapt.errors import ConfigError

if TYPE_CHECKING:
    from clinadapt.backbones.sam import PromptableSAM

EMBEDDING_CACHE_BYTES = 2 * 2**30
"""Frozen-encoder embeddings kept in memory: 512 LiteMedSAM images (4 MiB each)."""
ABSENT = -1.0e4
"""Class logit where no prompt of that class exists: finite, so softmax and cross-entropy are."""
PROMPT_KINDS = ("box", "points", "box+points")


@dataclass(frozen=True)
class PromptRecipe:
    """How training draws prompts from a target: ``prompt`` kind, each box side moved outward by
    a random 0..``jitter`` px of the encoder frame (MedSAM trains with 0-20 px at 1024, i.e. 5 at
    256), ``points`` positive and ``negatives`` negative points, at most ``max_prompts`` objects
    per image (a random subset; the others are left out of the loss). Validation draws every
    object's prompt without jitter, with a fixed seed."""

    prompt: str = "box"
    jitter: int = 5
    points: int = 1
    negatives: int = 0
    max_prompts: int = 16

    def __post_init__(self) -> None:
        if self.prompt not in PROMPT_KINDS:
            raise ConfigError(f"prompt must be one of {list(PROMPT_KINDS)}, got {self.prompt!r}")
        if self.max_prompts < 1:
            raise ConfigError(f"max_prompts must be at least 1, got {self.max_prompts}")
        if min(self.jitter, self.negatives) < 0 or self.points < 0:
            raise ConfigError("jitter, points and negatives must not be negative")

    @property
    def box(self) -> bool:
        return self.prompt != "points"

    @property
    def uses_points(self) -> bool:
        return self.prompt != "box"


class SegmenterOutput(NamedTuple):
    loss: torch.Tensor
    logits: torch.Tensor | None


class _Batch(NamedTuple):
    """A batch's prompts: ``image`` index, class ``label``, encoder-frame ``boxes`` (N, 4),
    ``points`` (N, P, 2) with ``point_labels`` (N, P) (-1 pads), and object ``masks`` (N, H, W)."""

    image: list[int]
    label: list[int]
    boxes: torch.Tensor
    points: torch.Tensor
    point_labels: torch.Tensor
    masks: torch.Tensor


class PromptedSegmenter(nn.Module):
    """``sam`` (a ``PromptableSAM``) trained and validated through prompts drawn from targets;
    see the module doc. ``dense`` (the image embedding) is what the precision check compares."""

    draws_prompts = True

    def __init__(
        self,
        sam: PromptableSAM,
        num_classes: int,
        recipe: PromptRecipe,
        cache_bytes: int = EMBEDDING_CACHE_BYTES,
    ) -> None:
        super().__init__()
        if num_classes < 2:
            raise ConfigError(f"a segmenter needs background and a class, got {num_classes}")
        self.sam, self.num_classes, self.recipe = sam, num_classes, recipe
        self.is_pretrained = sam.checkpoint is not None
        self.cache = EmbeddingCache(cache_bytes)

    def dense(self, images: torch.Tensor) -> torch.Tensor:
        return self.sam.embed_image(images)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """The image embeddings; remembered per image while the encoder is frozen (decoder-only
        training sees the same few images every epoch, and the encoder costs far more than the
        decoder)."""
        if any(p.requires_grad for p in self.sam.image_encoder.parameters()):
            self.cache.clear()
            return self.sam.embed_image(images)
        keys = [self.cache.key(x) for x in images]
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        if missing:
            with torch.no_grad():
                fresh = self.sam.embed_image(images[missing])
            for i, e in zip(missing, fresh, strict=True):
                self.cache.put(keys[i], e)
        return torch.stack([self.cache.get(k) for k in keys])

    def forward(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> SegmenterOutput:
        batch = self._prompts(targets, generator if self.training else None)
        if not batch.image:  # no object in any image: nothing to learn, a zero with a graph
            loss = sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
            logits = None if self.training else self._class_logits(targets, batch, None)
            return SegmenterOutput(torch.as_tensor(loss, device=images.device), logits)
        prompted = sorted(set(batch.image))  # images without an object need no embedding
        embeddings = self._embed(images[prompted])
        masks = self._decode(embeddings, prompted, batch, tuple(images.shape[-2:]))
        loss = dice_bce(masks, batch.masks.to(masks.device))
        logits = None if self.training else self._class_logits(targets, batch, masks)
        return SegmenterOutput(loss, logits)

    def _decode(
        self,
        embeddings: torch.Tensor,
        prompted: list[int],
        batch: _Batch,
        size: tuple[int, ...],
    ) -> torch.Tensor:
        """(N, H, W) mask logits at the input's size, one per prompt, image by image;
        ``embeddings`` are those of the ``prompted`` images of the batch, in that order."""
        device = embeddings.device
        index = torch.tensor(batch.image)
        out = []
        for row, i in enumerate(prompted):
            rows = (index == i).nonzero()[:, 0]
            kwargs = {}
            if self.recipe.box:
                kwargs["boxes"] = batch.boxes[rows].to(device)
            if self.recipe.uses_points:
                kwargs["points"] = batch.points[rows].to(device)
                kwargs["labels"] = batch.point_labels[rows].to(device)
            out.append(self.sam.predict_masks(embeddings[row : row + 1], **kwargs))
        low = torch.cat(out)
        if tuple(low.shape[-2:]) != size:
            low = F.interpolate(low, size, mode="bilinear", align_corners=False)
        return low[:, 0]

    def _class_logits(
        self, targets: torch.Tensor, batch: _Batch, masks: torch.Tensor | None
    ) -> torch.Tensor:
        b, k = targets.shape[0], self.num_classes
        logits = torch.full((b, k, *targets.shape[1:]), ABSENT, device=targets.device)
        logits[:, 0] = 0.0
        if masks is not None:
            masks = masks.float().to(targets.device)
            for n, (i, label) in enumerate(zip(batch.image, batch.label, strict=True)):
                logits[i, label] = torch.maximum(logits[i, label], masks[n])
        return logits

    def _prompts(self, targets: torch.Tensor, generator: torch.Generator | None) -> _Batch:
        """Prompts of every image's objects: random in training (a seed drawn from
        ``generator``), fixed and complete otherwise."""
        r = self.recipe
        training = generator is not None
        seed = int(torch.randint(2**62, (1,), generator=generator)) if training else 0
        rng = np.random.default_rng(seed)
        labels = targets.detach().cpu().numpy()
        image, label, boxes, points, point_labels, masks = [], [], [], [], [], []
        for i, mask in enumerate(labels):
            found = objects(mask)
            keep = np.arange(len(found))
            if training and len(found) > r.max_prompts:
                keep = np.sort(rng.choice(len(found), r.max_prompts, replace=False))
            for j in keep:
                label_j, region = found[j]
                p = object_prompt(
                    label_j,
                    region,
                    jitter=r.jitter if training else 0,
                    points=r.points if r.uses_points else 0,
                    negatives=r.negatives if r.uses_points else 0,
                    rng=rng,
                )
                image.append(i)
                label.append(p.label)
                boxes.append(p.box)
                points.append(p.points)
                point_labels.append(p.point_labels)
                masks.append(region)
        width = max((len(p) for p in points), default=0)
        padded = np.zeros((len(points), width, 2))
        pad_labels = np.full((len(points), width), -1, dtype=np.int64)  # SAM: -1 is no point
        for n, (p, lab) in enumerate(zip(points, point_labels, strict=True)):
            padded[n, : len(p)], pad_labels[n, : len(lab)] = p, lab
        shape = labels.shape[1:]
        return _Batch(
            image,
            label,
            torch.from_numpy(np.asarray(boxes, dtype=np.float32).reshape(-1, 4)),
            torch.from_numpy(padded.astype(np.float32)),
            torch.from_numpy(pad_labels),
            torch.from_numpy(np.asarray(masks, dtype=np.float32).reshape(-1, *shape)),
        )


class EmbeddingCache:
    """Image embeddings by the exact bytes of their preprocessed image, least recently used
    dropped beyond ``max_bytes``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.bytes = max_bytes, 0
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()

    @staticmethod
    def key(image: torch.Tensor) -> str:
        data = image.detach().float().cpu().contiguous().numpy().tobytes()
        return hashlib.blake2b(data, digest_size=16).hexdigest() + str(tuple(image.shape))

    def __contains__(self, key: str) -> bool:
        return key in self.items

    def get(self, key: str) -> torch.Tensor:
        self.items.move_to_end(key)
        return self.items[key]

    def put(self, key: str, embedding: torch.Tensor) -> None:
        size = embedding.numel() * embedding.element_size()
        if size > self.max_bytes:
            return
        self.items[key] = embedding.detach()
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.bytes -= old.numel() * old.element_size()

    def clear(self) -> None:
        self.items.clear()
        self.bytes = 0


def dice_bce(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """MedSAM's loss, averaged over prompts: soft Dice of the sigmoid (squared denominators,
    MONAI's ``DiceLoss(sigmoid=True, squared_pred=True)``) plus binary cross-entropy, per mask
    (N, H, W) against its object (N, H, W) in {0, 1}."""
    logits, masks = logits.float(), masks.float()
    p = torch.sigmoid(logits).flatten(1)
    t = masks.flatten(1)
    smooth = 1e-5
    dice = 1 - (2 * (p * t).sum(1) + smooth) / ((p * p).sum(1) + (t * t).sum(1) + smooth)
    return dice.mean() + F.binary_cross_entropy_with_logits(logits, masks)
