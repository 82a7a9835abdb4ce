"""``clinadapt pretrain``: self-supervised (continued) pretraining of a backbone on unlabelled
images, ending in a weights folder that every other command takes as ``--weights``."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from clinadapt.config import to_dict
from clinadapt.errors import ConfigError, DataError
from clinadapt.ssl.config import PretrainConfig

BACKBONE_DIR = "backbone"


def run_pretrain(cfg: PretrainConfig, run_dir: Path, *, progress: bool = True) -> dict[str, Any]:
    """Pretrain ``cfg.backbone`` with ``cfg.method``; write ``run_dir/backbone`` and return the
    run record (the caller writes it)."""
    from clinadapt.backbones import create_backbone, get_spec
    from clinadapt.backbones.weights import file_sha256
    from clinadapt.engine.batches import is_grayscale
    from clinadapt.engine.precision import decide_precision, resolve_device
    from clinadapt.engine.train import training_precision
    from clinadapt.runner.common import backbone_summary, dataset_summary, make_preprocess
    from clinadapt.runner.records import build_record
    from clinadapt.ssl import SSL_METHODS, create_pretrain_model
    from clinadapt.ssl.loop import UnlabelledImages, pretrain, resolved_config
    from clinadapt.ssl.views import ViewGenerator, resolve_views
    from clinadapt.tasks import TASKS

    start = time.perf_counter()
    SSL_METHODS.get(cfg.method)  # an unknown method fails before any data is read
    spec = get_spec(cfg.backbone)
    datasets = _load(cfg, spec)
    backbone = create_backbone(cfg.backbone, cfg.weights, trust_pickle=cfg.trust_pickle)
    preprocess = make_preprocess(backbone, cfg, TASKS.get("classification"))  # images only
    encoder = backbone.model.train().requires_grad_(True)
    lora_targets: list[str] = []
    with torch.random.fork_rng():  # LoRA factors, heads and decoders start the same for a seed
        torch.manual_seed(cfg.seed)
        if cfg.lora_rank:
            encoder, lora_targets = with_lora(encoder, cfg.lora_rank, cfg.lora_alpha, backbone.name)
            backbone.model = encoder
        model = create_pretrain_model(cfg.method, encoder, backbone.feature_dim, cfg.method_options)
    # colour jitter only when every pooled image is colour: it would tint grayscale scans
    grayscale = any(is_grayscale(d["train"].images, d.info.ndim == 3) for d in datasets)
    views = resolve_views(model.views, cfg.view_options, grayscale=grayscale)
    views = _fit_local_views(encoder, views, preprocess, spec.ndim)
    device = resolve_device("cpu" if cfg.device == "cpu" else None)
    images = UnlabelledImages([d["train"].images for d in datasets], preprocess)
    check = decide_precision(cfg.precision, device, _probe(encoder, images, cfg.batch_size, device))
    precision = training_precision(check.used, device)
    monitor, monitor_name = _monitor(cfg, datasets, backbone, preprocess, precision)
    freeze = cfg.norm_statistics == "frozen" or (
        cfg.norm_statistics == "auto" and backbone.is_pretrained
    )
    resolved = resolved_config(
        cfg,
        precision=precision,
        views=to_dict(views),
        weights_id=backbone.weights_id,
        train_images=len(images),
    )
    load_s = time.perf_counter() - start
    result = pretrain(
        model,
        images,
        ViewGenerator(views, cfg.seed),
        cfg,
        resolved=resolved,
        out_dir=run_dir,
        precision=precision,
        freeze_norm_statistics=freeze,
        monitor=monitor,
        progress=progress,
    )
    weights_dir = run_dir / BACKBONE_DIR
    plain = plain_encoder(encoder)
    _export(plain, cfg, backbone, spec, weights_dir)
    total = sum(p.numel() for p in plain.parameters())
    return build_record(
        "pretrain",
        to_dict(cfg),
        data=[
            dataset_summary(d.info, {k: len(v) for k, v in d.splits.items()}, dict(d.provenance))
            for d in datasets
        ],
        train_images=len(images),
        backbone=backbone_summary(backbone, cfg.weights, total),
        preprocessing={
            **preprocess.describe(),
            "precision": precision,
            "precision_check": check.to_dict(),
        },
        method={
            "name": cfg.method,
            "config": to_dict(model.config),
            "views": to_dict(views),
            "lora_targets": lora_targets,
            "trainable_parameters": result.trainable_parameters,
            "trainable_percent_of_backbone": 100.0
            * sum(p.numel() for p in encoder.parameters() if p.requires_grad)
            / total,
        },
        monitor=monitor_name,
        history=result.history,
        output={
            "weights": str(weights_dir),
            "sha256": file_sha256(weights_dir / "model.safetensors"),
        },
        timings={
            "setup_s": load_s,
            "setup_key": str(run_dir),
            "time_per_epoch_s": result.time_per_epoch_s,
            "train_s": result.total_s,
            "run_s": time.perf_counter() - start - load_s,
        },
        peak_memory=result.peak_memory_mb,
    )


def _probe(
    encoder: nn.Module, images: Any, batch_size: int, device: torch.device
) -> Callable[[str], np.ndarray]:
    """What ``precision=auto`` compares in fp32 and bf16: the encoder's features on the first
    batch of the pooled training images, preprocessed as for the views."""

    def probe(precision: str) -> np.ndarray:
        from clinadapt.engine.precision import forward_in

        x = torch.stack([images[i] for i in range(min(len(images), batch_size))])
        training = encoder.training
        try:
            return forward_in(encoder, x, precision, device)
        finally:
            encoder.train(training)

    return probe


def _load(cfg: PretrainConfig, spec: Any) -> list[Any]:
    """The datasets to pool; a folder of files without class sub-folders is read unlabelled,
    at the backbone's input size."""
    from clinadapt.backbones.registry import pretrained_config
    from clinadapt.data import load_dataset
    from clinadapt.data.local import load_unlabelled_folder

    ndim, datasets = spec.ndim, []
    size = cfg.input_size or pretrained_config(spec).input_size
    for name in cfg.datasets:
        path = Path(name).expanduser()
        flat = path.is_dir() and not any(p.is_dir() for p in path.iterdir())
        if flat:
            datasets.append(load_unlabelled_folder(path, image_size=size, volume_size=size))
        else:
            datasets.append(load_dataset(name, root=cfg.data_root, size=cfg.size))
    for d in datasets:
        if d.info.ndim != ndim:
            kind = {2: "2D images", 3: "3D volumes"}
            raise DataError(
                f"dataset {d.info.name!r} holds {kind[d.info.ndim]} but backbone "
                f"{cfg.backbone!r} takes {kind[ndim]}; pretrain a "
                f"{'volume-native (e.g. vit3d_t_28, resnet18_3d)' if d.info.ndim == 3 else '2D'} "
                "backbone on it, or pool only datasets of one kind"
            )
        if "train" not in d.splits or len(d["train"]) == 0:
            raise DataError(f"dataset {d.info.name!r} has no training images to pretrain on")
    return datasets


def _fit_local_views(encoder: nn.Module, views: Any, preprocess: Any, ndim: int) -> Any:
    """Local crops (DINO's multi-crop) at a size the encoder takes: a multiple of a ViT's patch,
    and timm ViTs switched to resampling their position embeddings for other sizes."""
    import dataclasses

    from clinadapt.ssl.views import ViewGenerator

    if not views.local_views:
        return views
    patch = getattr(getattr(encoder, "patch_embed", None), "patch_size", None)
    _, local = ViewGenerator(views, 0).sizes(preprocess.input_size)
    if patch is not None and not views.local_size:
        p = int(patch[0])
        views = dataclasses.replace(views, local_size=max(p, round(local / p) * p))
        local = views.local_size
    _allow_other_sizes(encoder)
    probe = torch.zeros(2, preprocess.channels, *[local] * ndim)
    encoder.eval()
    try:
        with torch.no_grad():
            encoder(probe)
    except (AssertionError, RuntimeError, ValueError) as err:
        raise ConfigError(
            f"the backbone cannot take {local}-pixel local crops ({err}); set views.local_size "
            "to a size it takes, or views.local_views=0"
        ) from None
    finally:
        encoder.train()
    return views


def _allow_other_sizes(encoder: nn.Module) -> None:
    """timm builds ViTs for one input size unless asked for ``dynamic_img_size``; this is that
    switch after construction (same weights, position embeddings resampled per batch)."""
    from timm.layers import Format
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(encoder, VisionTransformer) and not encoder.dynamic_img_size:
        encoder.dynamic_img_size = True
        embed = encoder.patch_embed
        embed.strict_img_size, embed.flatten, embed.output_fmt = False, False, Format.NHWC


def with_lora(
    encoder: nn.Module, rank: int, alpha: float, name: str
) -> tuple[nn.Module, list[str]]:
    """Freeze ``encoder`` and add LoRA layers (PEFT), so pretraining changes only a low-rank
    part of a general model."""
    from clinadapt.adapt.lora.model import default_targets, import_peft

    peft = import_peft()
    targets = default_targets(encoder)
    if not targets:
        raise ConfigError(f"lora_rank: backbone {name!r} has no layers LoRA can adapt")
    encoder.requires_grad_(False)
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, bias="none")
    return peft.LoraModel(encoder, config, "default"), targets


def plain_encoder(encoder: nn.Module) -> nn.Module:
    """The encoder as its library builds it: LoRA merged into the weights."""
    if hasattr(encoder, "peft_config"):
        return copy.deepcopy(encoder).merge_and_unload()
    return encoder


def _export(plain: nn.Module, cfg: PretrainConfig, backbone: Any, spec: Any, out: Path) -> None:
    """``model.safetensors`` + ``config.json`` that ``create_backbone(name, out)`` rebuilds."""
    from clinadapt.backbones.weights import CONFIG_FILE, WEIGHTS_FILE, resolve_local_weights
    from clinadapt.engine.checkpoint import save_safetensors
    from clinadapt.runner.records import is_main_process, write_json_atomic

    if not is_main_process():
        return
    kwargs = dict(spec.kwargs)
    if cfg.weights not in ("pretrained", "none"):
        kwargs.update(resolve_local_weights(Path(cfg.weights).expanduser()).create_kwargs)
    kwargs.pop("num_classes", None)
    pcfg = backbone.pretrained_cfg
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()}
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_safetensors(state, tmp)
    tmp.replace(out / WEIGHTS_FILE)
    write_json_atomic(
        out / CONFIG_FILE,
        {
            "architecture": spec.model_name,
            "create_model_kwargs": kwargs,
            "num_features": backbone.feature_dim,
            "input_size": [pcfg.channels, *[cfg.input_size or pcfg.input_size] * spec.ndim],
            "mean": list(pcfg.mean),
            "std": list(pcfg.std),
            "interpolation": pcfg.interpolation,
            "pretraining": {
                "method": cfg.method,
                "data": cfg.datasets,
                "epochs": cfg.epochs,
                "started_from": cfg.weights,
                "backbone": backbone.name,
                "lora_rank": cfg.lora_rank,
            },
        },
    )


def _monitor(
    cfg: PretrainConfig, datasets: list[Any], backbone: Any, preprocess: Any, precision: str
) -> tuple[Any, str | None]:
    """The online k-NN score: features of a labelled training sample (memory) and of the
    validation split (queries) from the current encoder, scored like ``knn`` runs."""
    if cfg.monitor == "none":
        return None, None
    from clinadapt.data.info import CLASSIFICATION_TASKS

    if cfg.monitor == "auto":  # the first pooled dataset with class labels and a validation split
        chosen = next(
            (
                d
                for d in datasets
                if d.info.task in CLASSIFICATION_TASKS and "val" in d.splits and len(d["val"])
            ),
            None,
        )
        if chosen is None:
            return None, None
    else:
        from clinadapt.data import load_dataset

        chosen = next((d for d in datasets if d.info.name == cfg.monitor), None)
        chosen = chosen or load_dataset(cfg.monitor, root=cfg.data_root, size=cfg.size)
        if chosen.info.task not in CLASSIFICATION_TASKS:
            raise ConfigError(
                f"monitor dataset {cfg.monitor!r} is a {chosen.info.task.value} dataset; the "
                "k-NN monitor needs class labels: choose a classification dataset or monitor=none"
            )
        if "val" not in chosen.splits:
            raise DataError(f"monitor dataset {cfg.monitor!r} has no validation split")
    from clinadapt.adapt.knn import KNN
    from clinadapt.data.dataset import Subset
    from clinadapt.data.transforms import slices_volumes
    from clinadapt.engine.features import extract_features
    from clinadapt.eval import evaluate

    info, train, val = chosen.info, chosen["train"], chosen["val"]
    rng = np.random.default_rng(cfg.seed)
    n = min(len(train), cfg.monitor_max_train)
    memory = np.sort(rng.choice(len(train), size=n, replace=False))
    slices = slices_volumes(info.ndim, preprocess)
    inference_precision = "bf16" if precision == "bf16" else "fp32"

    def features(images: Any) -> np.ndarray:
        return extract_features(
            backbone,
            images,
            preprocess,
            batch_size=cfg.batch_size,
            precision=inference_precision,
            is_volume=slices,
            device="cpu" if cfg.device == "cpu" else None,
            progress=False,
        )

    def score() -> dict[str, float]:
        knn = KNN().fit(
            features(Subset(train.images, memory)),
            train.labels[memory],
            info.task,
            info.num_classes,
        )
        metrics = evaluate(val.labels, knn.predict_proba(features(val.images)), info.task)
        return {f"knn_{k}": float(metrics[k]) for k in ("auc", "acc", "balanced_accuracy")}

    return score, info.name
