"""Test-time options of a classification run: test-time adaptation (``clinadapt.tta``) and the
adaptive-temperature softmax (``clinadapt.eval.adaptive_temperature`` on the classifier's output,
``clinadapt.backbones.adaptive_attention`` in timm ViTs' attention).

Both change only how the test predictions are made: training, the saved adapter, the fitted
probe and the validation outputs (which choose an epoch, C or a temperature) are those of the
run without them. Test-time adaptation needs a single-label classifier with a linear head: a
trained run's (``TTAModel.from_adapted``) or a linear probe on frozen features
(``TTAModel.from_linear_probe``). Methods that adapt the network (``adapts_network``: bn, tent,
sar, eata) run the backbone on the test images; the others (t3a, lame) read only features and
head outputs, so a frozen run gives them its extracted test features. Adaptive temperature
applies to any classifier (attention: to backbones with timm attention).

The defaults (tta none, adaptive temperature off) leave a run as it was: the same predictions,
and options that drop out of the run's identity (``resolve_options``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError

if TYPE_CHECKING:
    from clinadapt.adapt.finetune import AdaptedModel
    from clinadapt.adapt.linear import LinearProbe
    from clinadapt.tta import TTAModel

ADAPTIVE_TEMPERATURE = ("off", "output", "attention", "both")
TTA_FIELDS = ("tta", "tta_options", "tta_mode", "tta_batch_size")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NO_OP_NOTE = (
    "the output rule is a no-op here: binary and multi-label outputs are softmaxes over two "
    "values, whose entropy is at most ln 2 = 0.693 nats, and the polynomial stays below 1 (so "
    "beta = 1) for every entropy up to 0.849 nats"
)


def check_choices(cfg: Any) -> None:
    """Values that are wrong whatever the data: the tta mode, the adaptive-temperature setting,
    tta options without a tta method."""
    from clinadapt.registry import did_you_mean
    from clinadapt.tta.base import MODES

    if cfg.tta_mode not in MODES:
        hint = did_you_mean(str(cfg.tta_mode), list(MODES))
        raise ConfigError(f"tta_mode must be one of {list(MODES)}, got {cfg.tta_mode!r}.{hint}")
    if cfg.adaptive_temperature not in ADAPTIVE_TEMPERATURE:
        hint = did_you_mean(str(cfg.adaptive_temperature), list(ADAPTIVE_TEMPERATURE))
        raise ConfigError(
            f"adaptive_temperature must be one of {list(ADAPTIVE_TEMPERATURE)}, got "
            f"{cfg.adaptive_temperature!r}.{hint}"
        )
    if cfg.tta == "none" and cfg.tta_options:
        given = ", ".join(f"tta.{key}" for key in cfg.tta_options)
        raise ConfigError(f"{given} given, but tta is 'none'; choose a tta method or drop them")


def resolve_options(cfg: Any, options: dict[str, Any]) -> None:
    """Make ``options`` (a run's resolved options) hold the test-time options that decide its
    result: none at the defaults, so runs from before these options keep their identity; the
    tta method's options with their defaults filled in otherwise (unknown names and options
    raise here, before any work)."""
    from clinadapt.config import to_dict
    from clinadapt.tta import create_tta

    if cfg.tta == "none":
        for key in TTA_FIELDS:
            options.pop(key, None)
    else:
        options["tta_options"] = to_dict(create_tta(cfg.tta, cfg.tta_options).config)
    if cfg.adaptive_temperature == "off":
        options.pop("adaptive_temperature", None)


def active(cfg: Any) -> bool:
    return cfg.tta != "none" or cfg.adaptive_temperature != "off"


def output_on(cfg: Any) -> bool:
    return cfg.adaptive_temperature in ("output", "both")


def describe(cfg: Any) -> str:
    """The test-time options a run used, for titles: '' at the defaults."""
    parts = [f"tta {cfg.tta} ({cfg.tta_mode})"] if cfg.tta != "none" else []
    if cfg.adaptive_temperature != "off":
        parts.append(f"adaptive temperature: {cfg.adaptive_temperature}")
    return "".join(f", {part}" for part in parts)


def adapts_network(name: str) -> bool:
    """Whether tta method ``name`` needs the backbone run on images (not cached features)."""
    from clinadapt.tta import TTA_METHODS

    return TTA_METHODS.get(name).adapts_network


def check_test_time(cfg: Any, task: TaskType | None = None) -> None:
    """Refuse test-time options where they cannot apply, before any work: segmentation and
    prompted runs, multi-label tasks (tta: the methods adapt a softmax), frozen methods without a
    linear head (tta). ``task`` is the dataset's task when known; registered datasets tell it
    from their name."""
    if not active(cfg):
        return
    from clinadapt.adapt import METHODS
    from clinadapt.data.registry import DATASETS
    from clinadapt.runner.common import dataset_task

    given = ", ".join(
        f"{key}={value!r}"
        for key, value in (("tta", cfg.tta), ("adaptive_temperature", cfg.adaptive_temperature))
        if value not in ("none", "off")
    )
    kind = METHODS.get(cfg.method).kind
    if dataset_task(cfg).dense_targets or kind == "prompted":
        raise ConfigError(
            f"{given}: test-time adaptation and adaptive temperature apply to classification "
            f"runs; {cfg.dataset} with {cfg.method!r} segments, so drop them"
        )
    if cfg.tta == "none":
        return
    if task is None and cfg.dataset in DATASETS:
        task = DATASETS.get(cfg.dataset).task
    if task is TaskType.MULTILABEL:
        raise ConfigError(
            f"tta={cfg.tta!r}: test-time adaptation methods adapt a softmax over classes, "
            f"defined for single-label classifiers; {cfg.dataset} is multi-label (one sigmoid "
            "per label), so use tta none"
        )
    if kind == "frozen" and cfg.method != "linear":
        raise ConfigError(
            f"tta={cfg.tta!r} adapts a classifier with a linear head, and {cfg.method!r} "
            "predicts from its stored support features without one; use method linear (a "
            "linear probe on the same features), a trained method, or tta none"
        )


def trained_model(model: AdaptedModel, slices: bool, precision: str = "fp32") -> TTAModel:
    """A trained classification run's model as test-time adaptation sees it, its backbone
    computing in the run's ``precision``; with ``slices`` (volumes through a 2D backbone) its
    features are the mean over slices, so the linear head gives the mean of the slice logits,
    as the run's own predictions."""
    from clinadapt.tta import TTAModel

    if not slices and precision == "fp32":
        return TTAModel.from_adapted(model)
    features = SliceFeatures(model.backbone) if slices else model.backbone
    return TTAModel(at_precision(features, precision), model.head, name=model.backbone.name)


def probe_model(probe: LinearProbe, features: nn.Module, name: str) -> TTAModel:
    """A linear probe on ``features`` (a backbone, or the identity on extracted features)."""
    from clinadapt.tta import TTAModel

    head = probe.linear_head()
    return TTAModel.from_linear_probe(
        features, head.coef, head.intercept, head.mean, head.scale, name=name
    )


def at_precision(features: nn.Module, precision: str) -> nn.Module:
    """``features`` computing under the autocast of ``precision`` (bf16, fp16) with float32
    outputs, as the run's backbone computed its features or predictions; the head, softmax and
    the methods' losses stay in float32. fp32 returns ``features`` itself."""
    return features if precision == "fp32" else Autocast(features, precision)


class Autocast(nn.Module):
    """A module run under bf16 or fp16 autocast, its output cast to float32."""

    def __init__(self, module: nn.Module, precision: str) -> None:
        super().__init__()
        if precision not in AUTOCAST_DTYPES:
            raise ConfigError(f"precision must be bf16, fp16 or fp32, got {precision!r}")
        self.module, self.precision = module, precision
        self.name = getattr(module, "name", type(module).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=AUTOCAST_DTYPES[self.precision]):
            return self.module(x).float()


def image_batches(
    images: Any,
    preprocess: Any,
    batch_size: int,
    *,
    volume_mode: str | None = None,
    max_slices: int | None = None,
) -> Iterator[torch.Tensor]:
    """Preprocessed float batches of ``images`` in order, ``batch_size`` at a time. With
    ``volume_mode``, (B, D, H, W) volumes go to a 2D backbone as slices: the slices of each plane
    (``max_slices`` evenly spread per plane) preprocessed as images and stacked along the depth of
    a (B, C, slices, S, S) batch, which ``SliceFeatures`` averages as feature extraction does."""
    n = len(images)
    for start in range(0, n, batch_size):
        batch = np.asarray(images[np.arange(start, min(start + batch_size, n))])
        if volume_mode is None:
            yield torch.as_tensor(preprocess(batch)).float()
        else:
            yield _stack_slices(batch, preprocess, volume_mode, max_slices)


def _stack_slices(
    batch: np.ndarray, preprocess: Any, volume_mode: str, max_slices: int | None
) -> torch.Tensor:
    from clinadapt.engine.features import volume_planes

    planes = []
    for plane in volume_planes(batch, volume_mode, max_slices):
        b, s = plane.shape[:2]
        slices = np.ascontiguousarray(plane).reshape(b * s, *plane.shape[2:])
        x = torch.as_tensor(preprocess(slices)).float()
        planes.append(x.view(b, s, *x.shape[1:]))
    return torch.cat(planes, dim=1).transpose(1, 2).contiguous()


def feature_batches(features: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(features), batch_size):
        yield torch.as_tensor(np.asarray(features[start : start + batch_size], dtype=np.float32))


def settings(cfg: Any) -> dict[str, Any]:
    """A run's tta options as ``adapt`` takes them."""
    return {
        "name": cfg.tta,
        "options": cfg.tta_options,
        "mode": cfg.tta_mode,
        "batch_size": cfg.tta_batch_size,
        "seed": cfg.seed,
    }


def adapt(
    model: TTAModel,
    batches: Iterable[torch.Tensor],
    *,
    name: str,
    options: dict[str, Any],
    mode: str,
    batch_size: int,
    seed: int,
    inputs: str,
    precision: str = "fp32",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Test probabilities from tta ``name`` on ``batches`` (in test order), and the record's
    ``tta`` block; ``inputs`` says what the batches hold (images or extracted features),
    ``precision`` what ``model``'s features compute in (``at_precision``)."""
    from clinadapt.tta import create_tta

    result = create_tta(name, options).run(model, batches, mode=mode, seed=seed)
    stats = result.stats()
    counts = ("examples", "batches", "adapted", "filtered", "updates", "resets", "collapses")
    block = {
        "method": name,
        "applied": True,
        "mode": mode,
        "batch_size": batch_size,
        "options": stats["options"],
        "seed": seed,
        "inputs": inputs,
        "precision": precision,
        "stats": {**{key: stats[key] for key in counts}, "details": stats["details"]},
        "seconds": result.seconds,
        "seconds_per_image": result.seconds / max(result.examples, 1),
    }
    return result.probabilities, block


def frozen_predictions(
    cfg: Any, method: Any, features: np.ndarray, source: Any, *, progress: bool = False
) -> tuple[np.ndarray, dict[str, Any] | None, int]:
    """Test probabilities of a fitted frozen-feature ``method`` under the run's test-time
    options, the ``tta`` block (None without tta) and the number of attention modules patched.

    ``features`` are the extracted test features; ``source`` (a ``FeatureSource``) gives the
    backbone and test images for what features alone cannot do: adaptive attention (the test
    features are extracted again through the patched backbone) and tta methods that adapt the
    network (the probe then runs on top of the backbone, on the test images)."""
    from clinadapt.engine.precision import resolve_device

    if active(cfg) and source is None:
        raise ConfigError("test-time options need the run's backbone and images (a FeatureSource)")
    backbone = source.backbone if source is not None else None
    with attention_patch(cfg.adaptive_temperature, backbone) as patched:
        if patched:
            features = source.extract("test", progress=progress)
        if cfg.tta == "none":
            return method.predict_proba(features), None, patched
        if adapts_network(cfg.tta):
            trunk = SliceFeatures(backbone) if source.slices else backbone
            model = probe_model(method, at_precision(trunk, source.precision), backbone.name)
            model.to(resolve_device())  # where extraction runs (cached features ran nothing)
            batches = image_batches(
                source.images["test"],
                source.preprocess,
                cfg.tta_batch_size,
                volume_mode=source.volume_mode if source.slices else None,
                max_slices=source.max_slices,
            )
            inputs, precision = "images", source.precision
        else:
            model = probe_model(method, nn.Identity(), backbone.name)
            batches = feature_batches(features, cfg.tta_batch_size)
            inputs, precision = "extracted features", "fp32"
        probs, block = adapt(model, batches, **settings(cfg), inputs=inputs, precision=precision)
    return probs, block, patched


def unadapted_block(predict_s: float, n: int) -> dict[str, Any]:
    """The ``tta`` block of a run without test-time adaptation: its plain inference cost, the
    baseline of the methods' ``seconds_per_image``."""
    return {"method": "none", "applied": False, "seconds_per_image": predict_s / max(n, 1)}


def attention_patch(mode: str, module: nn.Module | None) -> contextlib.AbstractContextManager:
    """``adaptive_attention(module)`` when the adaptive-temperature ``mode`` includes attention,
    else nothing; the context yields the number of patched attention modules (0 when off)."""
    from clinadapt.backbones.adaptive_attention import adaptive_attention

    if mode in ("attention", "both"):
        return adaptive_attention(module)
    return contextlib.nullcontext(0)


def check_attention(mode: str, module: nn.Module) -> None:
    """Fail before training when the backbone has no attention to patch."""
    with attention_patch(mode, module):
        pass


def adaptive_output(probs: np.ndarray, task: TaskType | str) -> tuple[np.ndarray, int]:
    """Probabilities with the adaptive-temperature rule applied to the classifier's softmax, and
    how many examples it sharpened. The logits are ``log p`` (the softmax's logits up to a
    per-row constant, which changes neither the entropy nor the rescaled softmax); rows the rule
    leaves alone (beta = 1: every row of binary and multi-label tasks) are returned unchanged."""
    from clinadapt.eval.adaptive_temperature import (
        adaptive_beta,
        adaptive_temperature,
        softmax_entropy,
    )
    from clinadapt.eval.calibration import logits_from_probabilities

    if not TaskType(task).single_label:
        return probs, 0
    logits = torch.from_numpy(logits_from_probabilities(probs, task))
    sharpened = (adaptive_beta(softmax_entropy(logits, dim=1)) > 1).squeeze(1).numpy()
    new = adaptive_temperature(logits, dim=1).softmax(dim=1).numpy()
    return np.where(sharpened[:, None], new, probs), int(sharpened.sum())


def adaptive_block(
    mode: str, task: TaskType | str, attention_modules: int, sharpened: int | None
) -> dict[str, Any]:
    """The record's ``adaptive_temperature`` block: the setting, what it patched or sharpened,
    and the no-op note where the output rule cannot act."""
    block: dict[str, Any] = {"mode": mode, "applied": mode != "off"}
    if mode in ("attention", "both"):
        block["attention_modules"] = attention_modules
    if mode in ("output", "both"):
        block["sharpened_test_examples"] = sharpened
        if TaskType(task) in (TaskType.BINARY, TaskType.MULTILABEL):
            block["note"] = NO_OP_NOTE
    return block


class SliceFeatures(nn.Module):
    """A 2D backbone's features of (B, C, D, H, W) volumes: the mean over the D slices (for a
    linear head, the mean of the slice logits, as trained runs predict volumes; for a probe, the
    mean slice embedding, as feature extraction embeds volumes)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.name = getattr(backbone, "name", type(backbone).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d = x.shape[:3]
        z = self.backbone(x.transpose(1, 2).reshape(b * d, c, *x.shape[3:]))
        return z.view(b, d, -1).mean(dim=1)
