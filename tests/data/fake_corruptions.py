"""A small stand-in for medmnistc's corruption table, so shift tests run without medmnistc."""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from clinadapt.data import corruptions
from clinadapt.data.corruptions import Corruption


def noise(image: Image.Image, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Draws from the global numpy and Python generators, as medmnistc's corruptions do."""
    a = np.asarray(image).astype(np.int16)
    a = a + np.random.randint(-8 * severity, 8 * severity + 1, a.shape) + random.randint(0, 3)
    return np.clip(a, 0, 255).astype(np.uint8)


def darken(image: Image.Image, severity: int, rng: np.random.Generator) -> np.ndarray:
    return (np.asarray(image) // (severity + 1)).astype(np.uint8)


def table(calls: list[tuple[str, int]]) -> dict[str, dict[str, Corruption]]:
    """Corruptions for ``toymnist`` and ``synthetic-binary``; every application is counted."""

    def counted(name, fn):
        def apply(image, severity, rng):
            calls.append((name, severity))
            return fn(image, severity, rng)

        return apply

    entries = {
        "fake_noise": Corruption("fake_noise", (1, 2, 3, 4, 5), (1,) * 5, counted("n", noise)),
        # marks that fit only 40 px images from severity 4 on
        "fake_marks": Corruption(
            "fake_marks", (1, 2, 3, 4, 5), (1, 1, 1, 40, 40), counted("m", darken)
        ),
    }
    return {"toymnist": entries, "synthetic-binary": entries}


def install(monkeypatch) -> list[tuple[str, int]]:
    """Put the fake table in place of medmnistc's; returns the list of (corruption, severity)
    applications, one entry per image."""
    calls: list[tuple[str, int]] = []
    fake = table(calls)
    monkeypatch.setattr(corruptions, "corruption_table", lambda: fake)
    return calls
