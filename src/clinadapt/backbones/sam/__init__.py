"""Promptable segmentation with SAM-family models (LiteMedSAM, SAM, MedSAM): the model, its
strict loader, and the pre/post-processing between images, prompts and the encoder's frame."""

from clinadapt.backbones.sam.loader import infer_architecture, load_sam
from clinadapt.backbones.sam.model import (
    ARCHITECTURES,
    LITEMEDSAM,
    CheckpointInfo,
    PromptableSAM,
    SamArchitecture,
)
from clinadapt.backbones.sam.processing import ImageFrame, preprocess, resize_bilinear

__all__ = [
    "ARCHITECTURES",
    "LITEMEDSAM",
    "CheckpointInfo",
    "ImageFrame",
    "PromptableSAM",
    "SamArchitecture",
    "infer_architecture",
    "load_sam",
    "preprocess",
    "resize_bilinear",
]
