"""MedMNIST-C corruptions (Di Salvo et al. 2024, the ``medmnistc`` package): per 2D MedMNIST
dataset, the clinically motivated corruptions and their five severities, applied seeded.

Images go through medmnistc's own path: to RGB, corrupted, back to grey for grey datasets.
Two repairs of medmnistc 0.1.0 are made here, not patched into it: its motion blur decodes
ImageMagick's output with ``np.fromstring``, whose binary mode NumPy 2 removed, and recognises
a grey result only at 224 px; and its mark-drawing corruptions (stain deposits, bubbles,
characters) place marks sized for 224 px images, so at smaller sizes they cannot run: each
severity states the smallest image edge it needs, and is unavailable below it.
"""

from __future__ import annotations

import io
import random
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
from PIL import Image

from clinadapt.errors import ClinadaptError, ConfigError, DataError
from clinadapt.registry import did_you_mean

SEVERITIES = (1, 2, 3, 4, 5)
MEDMNISTC = "medmnistc==0.1.0"
INSTALL = (
    "MedMNIST-C corruptions need medmnistc, Wand and ImageMagick's MagickWand library: "
    f"pip install 'clinadapt[shift]' && pip install --no-deps {MEDMNISTC} (--no-deps: it pins "
    "medmnist==3.0.1 and scikit-image==0.23.2, which its corruptions do not need), and "
    "apt-get install imagemagick (macOS: brew install imagemagick); `make setup` does all "
    "three"
)


@dataclass(frozen=True)
class Corruption:
    """One corruption of one dataset. ``apply(rgb_image, severity, rng)`` returns the corrupted
    image as uint8 (H, W, 3); it may also draw from ``random`` and ``np.random``, which
    ``corrupt`` seeds. ``params`` are the five severities' parameters (they key the cache);
    ``min_size[s - 1]`` is the smallest image edge severity ``s`` can run on."""

    name: str
    params: tuple[Any, ...]
    min_size: tuple[int, ...]
    apply: Callable[[Image.Image, int, np.random.Generator], np.ndarray]


def _medmnistc() -> Any:
    """medmnistc's corruption registry, imported on first use; a missing medmnistc or
    MagickWand library (Wand raises ImportError for both) becomes an install hint."""
    import importlib

    try:
        return importlib.import_module("medmnistc.corruptions.registry")
    except ImportError as err:
        raise ClinadaptError(f"{INSTALL}. (The import failed: {err})") from None


def medmnistc_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("medmnistc")
    except PackageNotFoundError:
        return "unknown"


@cache
def corruption_table() -> dict[str, dict[str, Corruption]]:
    """Dataset name -> corruption name -> ``Corruption``, in medmnistc's order."""
    registry = _medmnistc()
    return {
        dataset: {name: _adapt(name, obj) for name, obj in table.items()}
        for dataset, table in registry.CORRUPTIONS_DS.items()
    }


def corruptions_for(dataset: str) -> dict[str, Corruption]:
    """The corruptions medmnistc defines for ``dataset``; ConfigError for any other dataset."""
    table = corruption_table()
    if dataset not in table:
        raise ConfigError(
            f"MedMNIST-C defines no corruptions for {dataset!r}; it covers "
            f"{', '.join(table)}.{did_you_mean(dataset, list(table))}"
        )
    return table[dataset]


def available_corruptions(dataset: str, size: int = 28) -> dict[str, tuple[int, ...]]:
    """Corruption name -> the severities (1-5) that run on ``size``-pixel images of
    ``dataset``; a corruption whose marks do not fit at any severity maps to ``()``."""
    return {
        name: tuple(s for s in SEVERITIES if size >= c.min_size[s - 1])
        for name, c in corruptions_for(dataset).items()
    }


def cell_seed(seed: int, dataset: str, corruption: str, severity: int) -> int:
    """The seed of one (dataset, corruption, severity) set: independent of which other sets
    are built, and of the order they are built in."""
    words = [seed, zlib.crc32(dataset.encode()), zlib.crc32(corruption.encode()), severity]
    return int(np.random.SeedSequence(words).generate_state(1)[0])


def corrupt(images: np.ndarray, corruption: Corruption, severity: int, *, seed: int) -> np.ndarray:
    """``images`` (N, H, W) grey or (N, H, W, 3) colour uint8, corrupted at ``severity``; the
    global random states are restored afterwards."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise DataError(
            f"MedMNIST-C corrupts uint8 2D images (N, H, W[, 3]); got {images.dtype} {images.shape}"
        )
    out = np.empty_like(images)
    with _seeded(seed) as rng:
        for i, image in enumerate(images):
            rgb = Image.fromarray(image).convert("RGB")
            result = np.asarray(corruption.apply(rgb, severity, rng))
            if result.shape != (*image.shape[:2], 3) or result.dtype != np.uint8:
                raise DataError(
                    f"corruption {corruption.name} at severity {severity} returned "
                    f"{result.dtype} {result.shape} for a {rgb.size[1]}x{rgb.size[0]} image; "
                    "expected uint8 (H, W, 3)"
                )
            out[i] = (
                result if images.ndim == 4 else np.asarray(Image.fromarray(result).convert("L"))
            )
    return out


@contextmanager
def _seeded(seed: int) -> Iterator[np.random.Generator]:
    np_state, py_state = np.random.get_state(), random.getstate()
    np.random.seed(seed)
    random.seed(seed)
    try:
        yield np.random.default_rng(seed)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)


def _adapt(name: str, obj: Any) -> Corruption:
    kind = type(obj).__name__
    params = tuple(obj.severity_params[: len(SEVERITIES)])
    apply = _motion_blur(obj) if kind == "MotionBlur" else _library_apply(obj)
    return Corruption(name, params, tuple(_min_size(kind, obj, s) for s in SEVERITIES), apply)


def _library_apply(obj: Any) -> Callable[[Image.Image, int, np.random.Generator], np.ndarray]:
    def apply(image: Image.Image, severity: int, rng: np.random.Generator) -> np.ndarray:
        obj.rng = rng  # impulse noise draws from it (medmnistc sets it the same way)
        return np.asarray(obj.apply(image, severity - 1))

    return apply


def _motion_blur(obj: Any) -> Callable[[Image.Image, int, np.random.Generator], np.ndarray]:
    """medmnistc's MotionBlur.apply with ``np.frombuffer`` and a colour decode (ImageMagick
    writes a grey PNG for grey content): the same pixels as medmnistc at 224 px, for RGB and
    grey, and the right shape at any other size."""
    import cv2
    from medmnistc.corruptions.filter import MotionImage

    def apply(image: Image.Image, severity: int, rng: np.random.Generator) -> np.ndarray:
        radius, sigma = obj.severity_params[severity - 1]
        png = io.BytesIO()
        image.save(png, format="PNG")
        with MotionImage(blob=png.getvalue()) as blurred:
            blurred.motion_blur(radius=radius, sigma=sigma, angle=np.random.uniform(-45, 45))
            blob = blurred.make_blob()
        bgr = cv2.imdecode(np.frombuffer(blob, np.uint8), cv2.IMREAD_COLOR)
        return np.ascontiguousarray(bgr[..., ::-1])

    return apply


def _min_size(kind: str, obj: Any, severity: int) -> int:
    """The smallest image edge at which medmnistc's mark placement cannot fail: it draws
    positions with ``random.randint(lo, hi)``, which fails when a mark does not fit."""
    param = obj.severity_params[severity - 1]
    if kind == "Bubble":  # randint(radius, width - radius), radius up to param[0]
        return 2 * int(param[0])
    if kind == "StainDeposit":  # randint(10, width - ink - 10), inks by severity index
        inks = obj.inks[str(max(3, severity - 1))]
        return max(max(ink.shape) for ink in inks) + 20
    if kind == "Characters":  # randint(10, width - 8 * letters), up to param[1] letters
        return 8 * int(param[1]) + 10
    return 1
