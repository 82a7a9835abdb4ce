"""Vision-language methods: class text through a backbone's text side (``Backbone.text``).

``TextMethod`` is their interface: ``use_text(space, class_text)`` before ``fit``; features are
the backbone's cached image features, which the methods bring into the joint space themselves
(``JointSpace.project_image``). ``zeroshot`` uses no labels (shots 0); ``tip_adapter``,
``tip_adapter_f`` and ``linear_zs`` start from the zero-shot classifier and adapt it with a few.
Prompt learning (``coop``, ``cocoop``, ``dapl``) learns context vectors in the text encoder's
input space (``adapt.vl.prompts``), through its token-level access.
"""

from clinadapt.adapt.vl import (  # noqa: F401  (registration)
    cocoop,
    coop,
    dapl,
    linear_zs,
    tip_adapter,
    zeroshot,
)
from clinadapt.adapt.vl.base import TextMethod, TextOptions, no_text_side

__all__ = ["TextMethod", "TextOptions", "no_text_side"]
