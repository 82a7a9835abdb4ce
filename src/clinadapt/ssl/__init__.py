"""Self-supervised pretraining: methods composed from losses, heads, views and masking."""

from clinadapt.ssl import dino, mae, simclr  # noqa: F401  (each registers its method)
from clinadapt.ssl.base import SSL_METHODS, PretrainModel, create_pretrain_model

__all__ = ["SSL_METHODS", "PretrainModel", "create_pretrain_model"]
