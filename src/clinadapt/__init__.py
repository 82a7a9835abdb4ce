"""clinadapt: adapt general-purpose vision foundation models to medical images."""

__version__ = "0.1.0"
