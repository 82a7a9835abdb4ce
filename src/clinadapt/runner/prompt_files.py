"""Prompts per file for ``clinadapt segment``, read from a CSV or JSON file into the mapping
``{file: {"boxes": [...], "points": [...], "labels": [...]}}`` that ``segment_files`` takes.

Values are kept as written (4 or 6 numbers a box, 2 or 3 a point): whether a file is an image or
a volume, and so how many it needs, is checked when the file is matched to an input.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from clinadapt.errors import ConfigError, DataError

CSV_BOX = ("x0", "y0", "x1", "y1")
CSV_POINT = ("x", "y")
CSV_COLUMNS = ("file", *CSV_BOX, "z0", "z1", *CSV_POINT, "z", "label")

PROMPT_FORMATS = (
    "a prompt CSV has a file column and x0, y0, x1, y1 (a box; with z0, z1 on a volume) and/or "
    "x, y (a point; z on a volume, label 1 foreground or 0 background), one box or point a row"
)


def read_prompts(path: str | Path) -> dict[str, dict[str, list]]:
    """Prompts per file from a CSV (``PROMPT_FORMATS``; several rows of one file are several
    boxes, or the points of one object) or a JSON file ``{file: {"boxes": [[x0, y0, x1, y1],
    ...], "points": [[x, y], ...], "labels": [1, ...]}}``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file {path} does not exist")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".json"):
        raise ConfigError(f"prompt file {path}: give a .csv or .json file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the prompt file {path} ({err})") from None
    return _read_csv(text, path) if suffix == ".csv" else _read_json(text, path)


def _read_json(text: str, path: Path) -> dict[str, dict[str, list]]:
    try:
        data = json.loads(text)
    except ValueError as err:
        raise DataError(f"cannot read the prompt file {path} as JSON ({err})") from None
    if not isinstance(data, dict) or not data:
        raise DataError(
            f'{path}: expected {{"file.png": {{"boxes": [[x0, y0, x1, y1]], "points": [[x, y]], '
            f'"labels": [1]}}, ...}}, got {type(data).__name__}'
        )
    return data


def _read_csv(text: str, path: Path) -> dict[str, dict[str, list]]:
    reader = csv.DictReader(io.StringIO(text))
    try:
        reader.fieldnames = [h.strip().lower() for h in reader.fieldnames or []]
        rows = list(reader)
    except csv.Error as err:
        raise DataError(f"cannot read the prompt file {path} as CSV ({err})") from None
    header = reader.fieldnames
    unknown = [h for h in header if h not in CSV_COLUMNS]
    drawable = set(CSV_BOX) <= set(header) or set(CSV_POINT) <= set(header)
    if unknown or "file" not in header or not drawable:
        found = f"unknown columns {unknown}" if unknown else f"columns {header}"
        raise DataError(f"{path}: {found}; {PROMPT_FORMATS}")
    prompts: dict[str, dict[str, list]] = {}
    for n, row in enumerate(rows, start=2):
        if None in row:
            raise DataError(f"{path} row {n} has more cells than the header")
        cells = {k: (v or "").strip() for k, v in row.items()}
        if not cells["file"]:
            raise DataError(f"{path} row {n} names no file")
        entry = prompts.setdefault(cells["file"], {"boxes": [], "points": [], "labels": []})
        box = any(cells.get(c) for c in (*CSV_BOX, "z0", "z1"))
        point = any(cells.get(c) for c in (*CSV_POINT, "z", "label"))
        if not box and not point:
            raise DataError(f"{path} row {n} has neither a box nor a point; {PROMPT_FORMATS}")
        if box:
            columns = ("x0", "y0", "z0", "x1", "y1", "z1")
            if not (cells.get("z0") or cells.get("z1")):
                columns = CSV_BOX
            entry["boxes"].append([_cell(cells, c, path, n) for c in columns])
        if point:
            columns = (*CSV_POINT, "z") if cells.get("z") else CSV_POINT
            entry["points"].append([_cell(cells, c, path, n) for c in columns])
            entry["labels"].append(_cell(cells, "label", path, n) if cells.get("label") else 1)
    if not prompts:
        raise DataError(f"{path} has no rows; {PROMPT_FORMATS}")
    return prompts


def _cell(cells: dict[str, str], column: str, path: Path, row: int) -> float:
    value = cells.get(column, "")
    try:
        return float(value)
    except ValueError:
        problem = "is empty" if not value else f"{value!r} is not a number"
        raise DataError(f"{path} row {row}: {column} {problem}; {PROMPT_FORMATS}") from None
