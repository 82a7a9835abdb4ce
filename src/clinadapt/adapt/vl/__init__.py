"""Vision-language methods: class text through a backbone's text side (``Backbone.text``).

``TextMethod`` is their interface: ``use_text(space, class_text)`` before ``fit``; features are
the backbone's cached image features, which the methods bring into the joint space themselves
(``JointSpace.project_image``). ``zeroshot`` uses no labels (shots 0); ``tip_adapter``,
``tip_adapter_f`` and ``linear_zs`` start from the zero-shot classifier and adapt it with a few.
"""

from clinadapt.adapt.vl import linear_zs, tip_adapter, zeroshot  # noqa: F401  (registration)
from clinadapt.adapt.vl.base import TextMethod, TextOptions, no_text_side

__all__ = ["TextMethod", "TextOptions", "no_text_side"]
