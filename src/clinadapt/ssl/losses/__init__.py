"""One loss per file, each checked against a deliberately naive reference in the tests."""

from clinadapt.ssl.losses.dino import DINOLoss
from clinadapt.ssl.losses.masked_mse import masked_patch_mse
from clinadapt.ssl.losses.nt_xent import nt_xent

__all__ = ["DINOLoss", "masked_patch_mse", "nt_xent"]
