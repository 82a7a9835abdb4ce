"""Malformed inputs through the public readers: each one loads (and its images can be fed to a
model) or raises a ClinadaptError; never another exception, never a hang.

Inputs are generated from a fixed seed: npz files (MedMNIST layout and predict's), image files,
NIfTI volumes and CSV manifests, each broken in one or two ways at random.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import signal
import struct
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from clinadapt.data import load_dataset
from clinadapt.data.transforms import Preprocess, VolumePreprocess
from clinadapt.errors import ClinadaptError
from clinadapt.runner.predict import iter_inputs

SEED = 8
CASE_SECONDS = 10  # a case that takes longer counts as a hang
IMAGE = 8  # image edge and volume cube used by the local readers
PREPROCESS = Preprocess(IMAGE, (0.5,), (0.5,), "nearest")
PREPROCESS_28 = Preprocess(28, (0.5,), (0.5,), "nearest")
VOLUME_PREPROCESS = VolumePreprocess(IMAGE, 0.5, 0.5, "nearest")


class Hang(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Tally:
    """Outcomes of the cases of one test; failures keep the case name and the traceback."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []

    def run(self, name: str, case: Callable[[], None]) -> str:
        try:
            with time_limit(CASE_SECONDS), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                case()
            outcome = "loaded"
        except ClinadaptError as err:
            assert str(err), f"{name}: empty error message"
            outcome = "clean error"
        except Exception:
            outcome = "other exception"
            self.failures.append(f"{name}:\n{traceback.format_exc(limit=-3)}")
        self.counts[outcome] += 1
        return outcome

    def check(self, what: str) -> None:
        print(f"{what}: {sum(self.counts.values())} cases, {dict(self.counts)}")
        assert not self.failures, "\n".join(self.failures[:5])
        assert self.counts["loaded"] and self.counts["clean error"], self.counts


def feed(images: object, preprocess: Preprocess | VolumePreprocess) -> None:
    batch = np.asarray(images)
    if len(batch):
        preprocess(batch[:4])


def read_dataset(name: str, **options) -> None:
    """Load, then read every image of every split and feed a batch to the model's transform."""
    ds = load_dataset(name, **options)
    volumes = ds.info.ndim == 3
    for split in ds.splits.values():
        images = split.images[np.arange(len(split))]
        assert len(images) == len(split.labels)
        if volumes and ds.size == IMAGE:
            feed(images, VOLUME_PREPROCESS)
        elif not volumes:
            feed(images, PREPROCESS if ds.size != 28 else PREPROCESS_28)


def read_predict_inputs(path: Path, *, size: int, ndim: int) -> None:
    items = list(iter_inputs([str(path)], size=size, channels=1, ndim=ndim))
    for _, image in items:
        if ndim == 3:
            feed(image[None], VolumePreprocess(size, 0.5, 0.5, "nearest"))
        else:
            feed(image[None], Preprocess(size, (0.5,), (0.5,), "nearest"))


def corrupt_bytes(raw: bytes, rng: np.random.Generator) -> bytes:
    """One of: truncated, bytes flipped, junk appended, random bytes, empty."""
    kind = rng.integers(5)
    if kind == 0:
        return raw[: int(rng.integers(0, max(1, len(raw))))]
    if kind == 1:
        out = bytearray(raw)
        for i in rng.integers(0, len(out), size=int(rng.integers(1, 8))):
            out[i] ^= int(rng.integers(1, 256))
        return bytes(out)
    if kind == 2:
        return raw + rng.bytes(int(rng.integers(1, 200)))
    if kind == 3:
        return rng.bytes(int(rng.integers(1, 400)))
    return b""


# npz files ----------------------------------------------------------------------------------


def valid_arrays(rng: np.random.Generator, n: int = 4) -> dict[str, np.ndarray]:
    out = {}
    for split in ("train", "val", "test"):
        out[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        out[f"{split}_labels"] = rng.integers(0, 2, (n, 1), dtype=np.uint8)
    return out


def break_arrays(arrays: dict[str, np.ndarray], rng: np.random.Generator) -> None:
    key = str(rng.choice(sorted(arrays)))
    value = arrays[key]
    kind = int(rng.integers(12))
    if kind == 0:
        del arrays[key]
    elif kind == 1:  # another dtype, values as they come
        dtype = rng.choice(["int8", "uint16", "int16", "int64", "float16", "float64", "bool"])
        arrays[key] = value.astype(dtype)
    elif kind == 2:  # floats in some range
        low, high = [(0, 1), (0, 255), (-1, 1), (0, 1e6), (-1e-7, 1 + 1e-7)][rng.integers(5)]
        arrays[key] = rng.uniform(low, high, value.shape).astype(rng.choice(["<f4", "<f8"]))
    elif kind == 3:  # big-endian
        arrays[key] = value.astype(value.dtype.newbyteorder(">"))
        if rng.random() < 0.5:
            arrays[key] = (value / 255).astype(">f4")
    elif kind == 4:
        shapes = [(4, 28), (4, 28, 28, 3), (4, 32, 32), (4, 28, 28, 1), (), (4,), (4, 2), (3, 1)]
        shape = shapes[rng.integers(len(shapes))]
        arrays[key] = np.zeros(shape, value.dtype)
    elif kind == 5:  # NaN or infinity
        floats = value.astype(np.float32) / (255 if "images" in key else 1)
        if floats.size:
            floats.flat[rng.integers(floats.size)] = rng.choice([np.nan, np.inf, -np.inf])
        arrays[key] = floats
    elif kind == 6:  # object arrays (pickled)
        arrays[key] = np.array([None, "x", 1], dtype=object)
    elif kind == 7:  # empty
        arrays[key] = value[:0]
    elif kind == 8:  # labels out of range or not integers
        bad = [-1, 2, 7, 0.5, 1e9]
        arrays[key] = np.full(value.shape, bad[rng.integers(len(bad))])
    elif kind == 9:  # lengths that disagree
        arrays[key] = value[: len(value) - 1]
    elif kind == 10:  # strings and structured values
        arrays[key] = value.astype("U3") if rng.random() < 0.5 else np.zeros(value.shape, "V3")
    else:  # a Fortran-ordered copy, as some writers produce
        arrays[key] = np.asfortranarray(value)


def npz_cases(rng: np.random.Generator, count: int) -> Iterator[tuple[str, Callable[[Path], None]]]:
    for i in range(count):
        arrays = valid_arrays(rng)
        broken = int(rng.integers(0, 3))  # 0: a control that must load
        for _ in range(broken):
            break_arrays(arrays, rng)
        if rng.random() < 0.3:  # predict also reads an ``images`` array
            arrays["images"] = arrays.pop("test_images", np.zeros((2, 28, 28), np.uint8))
        damage = broken and rng.random() < 0.3
        compressed = rng.random() < 0.5

        def write(folder: Path, arrays=arrays, damage=damage, compressed=compressed) -> Path:
            path = folder / "breastmnist.npz"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                (np.savez_compressed if compressed else np.savez)(path, **arrays)
            if damage:
                path.write_bytes(corrupt_bytes(path.read_bytes(), rng))
            return path

        yield f"npz-{i}", write


def test_fuzzed_npz_files(tmp_path):
    rng = np.random.default_rng(SEED)
    tally = Tally()
    for name, write in npz_cases(rng, 150):
        folder = tmp_path / name
        folder.mkdir()
        path = write(folder)
        tally.run(f"{name} dataset", lambda folder=folder: read_dataset_npz(folder))
        tally.run(f"{name} predict", lambda path=path: read_predict_inputs(path, size=28, ndim=2))
    tally.check("npz")


def read_dataset_npz(folder: Path) -> None:
    read_dataset("breastmnist", root=folder, size=28, download=False)


# image files --------------------------------------------------------------------------------

IMAGE_SUFFIXES = [".png", ".jpg", ".bmp", ".tif", ".webp"]


def image_bytes(rng: np.random.Generator) -> tuple[bytes, str]:
    """A small image in one of many modes and formats, possibly damaged or mislabelled."""
    shape = tuple(int(s) for s in rng.integers(1, 20, 2))
    mode = str(rng.choice(["L", "RGB", "RGBA", "P", "LA", "1", "I;16", "I", "F", "CMYK"]))
    if mode in ("I;16", "I"):
        image = Image.fromarray(rng.integers(0, 65535, shape).astype(np.uint16))
        if mode == "I":
            image = image.convert("I")
    elif mode == "F":
        data = rng.normal(size=shape).astype(np.float32)
        if rng.random() < 0.3:
            data.flat[0] = np.nan
        image = Image.fromarray(data, mode="F")
    else:
        image = Image.fromarray(rng.integers(0, 256, (*shape, 3), dtype=np.uint8)).convert(mode)
    formats = {
        "L": ["PNG", "JPEG", "BMP", "TIFF", "WEBP"],
        "RGB": ["PNG", "JPEG", "BMP", "TIFF", "WEBP"],
        "RGBA": ["PNG", "TIFF", "WEBP"],
        "P": ["PNG", "BMP", "TIFF"],
        "LA": ["PNG", "TIFF"],
        "1": ["PNG", "BMP", "TIFF"],
        "I;16": ["PNG", "TIFF"],
        "I": ["TIFF"],
        "F": ["TIFF"],
        "CMYK": ["JPEG", "TIFF"],
    }[mode]
    fmt = str(rng.choice(formats))
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    raw = buffer.getvalue()
    suffix = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}[fmt]
    kind = rng.integers(6)
    if kind == 0:
        raw = corrupt_bytes(raw, rng)
    elif kind == 1:  # the wrong extension
        suffix = str(rng.choice(IMAGE_SUFFIXES))
    elif kind == 2 and fmt == "PNG":  # a header that claims an enormous image
        raw = raw[:16] + struct.pack(">II", 40000, 40000) + raw[24:29] + raw[33:]
        crc = zlib.crc32(raw[12:29]) & 0xFFFFFFFF
        raw = raw[:29] + struct.pack(">I", crc) + raw[29:]
    elif kind == 3:
        raw = b"this is not an image\n"
    return raw, suffix


def good_png(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (10, 12), dtype=np.uint8)).save(path)


def given_splits_folder(root: Path, rng: np.random.Generator, write: Callable) -> None:
    for split in ("train", "val", "test"):
        for label in ("a", "b"):
            write(root / split / label / f"{split}-{label}", rng)


def test_fuzzed_image_files(tmp_path):
    rng = np.random.default_rng(SEED + 1)
    tally = Tally()
    for i in range(80):
        root = tmp_path / f"images-{i}"
        given_splits_folder(root, rng, lambda p, r: good_png(p.with_suffix(".png"), r))
        raw, suffix = image_bytes(rng)
        split, label = rng.choice(["train", "val", "test"]), rng.choice(["a", "b"])
        bad = root / split / label / f"case{suffix}"
        bad.write_bytes(raw)
        tally.run(f"images-{i} folder", lambda root=root: read_dataset(str(root), image_size=IMAGE))
        tally.run(f"images-{i} predict", lambda bad=bad: read_predict_inputs(bad, size=28, ndim=2))
    empty = tmp_path / "empty.png"
    empty.mkdir()  # a folder named like an image
    tally.run("folder named .png", lambda: read_predict_inputs(empty, size=28, ndim=2))
    tally.check("images")


# NIfTI volumes ------------------------------------------------------------------------------


def nifti_bytes(rng: np.random.Generator) -> tuple[bytes, str]:
    shapes = [(6, 7, 5), (6, 7), (6, 7, 5, 2), (6, 7, 5, 1, 2), (6, 7, 5, 1), (1, 1, 1), (9, 1, 3)]
    shape = shapes[rng.integers(len(shapes))]
    dtype = rng.choice(["float32", "int16", "uint8", "float64", "int32", "uint16"])
    data = (rng.normal(size=shape) * 100).astype(dtype)
    if data.dtype.kind == "f" and rng.random() < 0.3:
        data.flat[rng.integers(data.size)] = rng.choice([np.nan, np.inf])
    image = nib.Nifti1Image(data, np.eye(4))
    raw = image.to_bytes()
    kind = rng.integers(5)
    if kind == 0:  # a header field set to a random value (not the sizes: see below)
        offset = int(rng.choice([70, 72, 108, 112, 116, 252, 254, 280, 344]))
        width = 2 if offset in (70, 72, 252, 254) else 4
        raw = raw[:offset] + rng.bytes(width) + raw[offset + width :]
    elif kind == 1:  # small but wrong sizes; large ones would make nibabel allocate them
        dims = [int(v) for v in rng.integers(-3, 12, 8)]
        raw = raw[:40] + struct.pack("<8h", *dims) + raw[56:]
    elif kind == 2:
        raw = corrupt_bytes(raw, rng)
    compress = kind != 1 and rng.random() < 0.4  # gzip only headers with their real sizes
    return (gzip.compress(raw), ".nii.gz") if compress else (raw, ".nii")


def good_nifti(path: Path, rng: np.random.Generator) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(rng.normal(size=(5, 6, 7)).astype(np.float32), np.eye(4)), path)


def test_fuzzed_nifti_volumes(tmp_path):
    rng = np.random.default_rng(SEED + 2)
    tally = Tally()
    for i in range(50):
        root = tmp_path / f"volumes-{i}"
        given_splits_folder(root, rng, lambda p, r: good_nifti(p.with_suffix(".nii"), r))
        raw, suffix = nifti_bytes(rng)
        bad = root / "train" / "a" / f"case{suffix}"
        bad.write_bytes(raw)
        tally.run(f"nifti-{i} folder", lambda root=root: read_dataset(str(root), volume_size=IMAGE))
        tally.run(f"nifti-{i} predict", lambda p=bad: read_predict_inputs(p, size=IMAGE, ndim=3))
    tally.check("nifti")


# CSV manifests ------------------------------------------------------------------------------

HEADERS = [
    "path,label,split",
    "path,label",
    "path,label,split,patient_id",
    "label,split",
    "path,split",
    "PATH , Label ,Split",
    "",
]


def manifest_text(rng: np.random.Generator, files: list[str]) -> bytes:
    header = HEADERS[rng.integers(len(HEADERS))]
    columns = [c.strip().lower() for c in header.split(",")] if header else []
    rows = []
    for i, name in enumerate(files):
        values = {
            "path": name,
            "label": "ab"[i % 2],
            "split": ("train", "val", "test")[i // 2 % 3],
            "patient_id": f"p{i}",
        }
        rows.append([values.get(c, "") for c in columns])
    for _ in range(int(rng.integers(0, 3))):
        if not rows:
            break
        row = rows[rng.integers(len(rows))]
        column = int(rng.integers(len(row))) if row else 0
        kind = rng.integers(9)
        if kind == 0 and row:
            row[column] = ""
        elif kind == 1 and row:
            row[column] = str(rng.choice(["missing.png", "../x.png", "/abs/none.png", "sub"]))
        elif kind == 2 and row:
            row[column] = str(rng.choice(["-1", "7", "a|b", "|", "tset", "TRAIN", "é", "0x1"]))
        elif kind == 3:
            rows.append(list(rows[rng.integers(len(rows))]))  # a duplicate row
        elif kind == 4:
            row.append("extra")
        elif kind == 5 and row:
            row.pop()
        elif kind == 6:
            row[column:column] = ['"unbalanced']
        elif kind == 7:
            rows = rows[: int(rng.integers(0, len(rows)))]
        else:
            for other in rows:  # every row the same class
                if "label" in columns:
                    other[columns.index("label")] = "a"
    text = "\n".join([header, *(",".join(r) for r in rows)]) + "\n"
    raw = text.encode()
    kind = rng.integers(8)
    if kind == 0:
        raw = corrupt_bytes(raw, rng)
    elif kind == 1:
        raw = "\ufeff".encode() + raw
    elif kind == 2:
        raw = raw.replace(b",", b";")
    elif kind == 3:
        raw = raw + b"\x00\xff\xfe"
    elif kind == 4:
        raw = raw.replace(b"\n", b"\r\n")
    return raw


def test_fuzzed_csv_manifests(tmp_path):
    rng = np.random.default_rng(SEED + 3)
    files = []
    for i in range(12):  # enough for an automatic split
        good_png(tmp_path / "img" / f"{i}.png", rng)
        files.append(f"img/{i}.png")
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # signature only
    good_nifti(tmp_path / "img" / "v.nii", rng)
    (tmp_path / "sub").mkdir()
    extras = ["img/bad.png", "img/v.nii", "sub", "img/../img/0.png", "img"]
    tally = Tally()
    for i in range(120):
        listed = list(files)
        if rng.random() < 0.3:
            listed[rng.integers(len(listed))] = extras[rng.integers(len(extras))]
        csv = tmp_path / f"m{i}.csv"
        csv.write_bytes(manifest_text(rng, listed))
        tally.run(f"manifest-{i}", lambda csv=csv: read_dataset(str(csv), image_size=IMAGE))
    tally.check("manifests")


@pytest.mark.parametrize("name", ["0.png", "x.nii.gz", "m.csv"])
def test_empty_files(tmp_path, name):
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(ClinadaptError):
        if name.endswith(".csv"):
            read_dataset(str(tmp_path / name))
        else:
            read_predict_inputs(tmp_path / name, size=IMAGE, ndim=3 if ".nii" in name else 2)
