"""Visual Prompt Tuning (Jia et al. 2022); importing registers ``vpt``."""

from clinadapt.adapt.vpt.config import VPTConfig
from clinadapt.adapt.vpt.model import VPT, PromptedViT

__all__ = ["VPT", "PromptedViT", "VPTConfig"]
