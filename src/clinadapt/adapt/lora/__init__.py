"""LoRA (Hu et al. 2022) through Hugging Face PEFT; importing registers ``lora``."""

from clinadapt.adapt.lora.config import LoRAConfig
from clinadapt.adapt.lora.model import LoRA, default_targets

__all__ = ["LoRA", "LoRAConfig", "default_targets"]
