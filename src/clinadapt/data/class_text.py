"""Class text: what vision-language methods say about each class of a dataset.

One record per dataset, like ``DatasetInfo``: per class a ``name`` and a short clinical
``description`` (noun phrases), and modality-aware ``templates`` ("a breast ultrasound image of
{}.") into which either is put. Multi-label datasets also need ``negative_templates`` ("a chest
X-ray with no {}."): each label is then a two-way choice between its absence and its presence.
The 18 MedMNIST datasets have theirs in ``class_text.json``; any other dataset gets its own from a
YAML or JSON file in the same format (``class_text=PATH``)::

    templates: ["a dermoscopy image of {}."]
    classes:
      melanoma: {name: melanoma, description: an asymmetric lesion with irregular borders}
      nevus: {description: a symmetric brown mole}   # name defaults to the label
"""

from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from clinadapt.data.info import DatasetInfo, TaskType
from clinadapt.errors import ConfigError, DataError

USES = ("names", "descriptions", "both")
"""Which phrase of each class goes into the templates: its name, its description, or both (the
embeddings of all their prompts are averaged, as template ensembles are)."""
MAX_FILE_BYTES = 1 << 20
"""A class-text file is a few lines per class; anything larger than 1 MiB is a mistake."""
MAX_TEXT_CHARS = 1000
"""A template, name or description longer than this is not a prompt."""
_TOP_KEYS = ("templates", "negative_templates", "classes")
_CLASS_KEYS = ("name", "description")
BUILTIN_FILE = "class_text.json"


@dataclass(frozen=True)
class ClassEntry:
    label: str
    name: str
    description: str = ""


@dataclass(frozen=True)
class ClassText:
    """Validated class text of one dataset, classes in the dataset's label order. ``source`` says
    where it came from (``built-in:<dataset>`` or a file path) and ``sha256`` fingerprints its
    content, so that records and run identities change when the text does."""

    templates: tuple[str, ...]
    classes: tuple[ClassEntry, ...]
    negative_templates: tuple[str, ...]
    source: str
    sha256: str

    def phrases(self, entry: ClassEntry, use: str) -> list[str]:
        """The phrases of one class that fill the templates."""
        if use not in USES:
            raise ConfigError(f"text must be one of {list(USES)}, got {use!r}")
        if use != "names" and not entry.description:
            raise ConfigError(
                f"class {entry.label!r} has no description in {self.source}; add one or use "
                "text=names"
            )
        return {
            "names": [entry.name],
            "descriptions": [entry.description],
            "both": [entry.name, entry.description],
        }[use]

    def prompts(self, task: TaskType, use: str = "names") -> list[list[list[str]]]:
        """The prompts of each choice a classifier makes: ``heads[h][k]`` lists the prompts of
        option k of head h. Single-label tasks have one head whose options are the classes;
        multi-label tasks one head per label with options (absent, present)."""
        if task is TaskType.MULTILABEL:
            if not self.negative_templates:
                raise ConfigError(
                    f"{self.source}: a multi-label dataset needs negative_templates (e.g. 'a "
                    "chest X-ray with no {}.'): each label is scored as absent against present"
                )
            return [
                [
                    [t.format(entry.name) for t in self.negative_templates],
                    [t.format(p) for p in self.phrases(entry, use) for t in self.templates],
                ]
                for entry in self.classes
            ]
        return [
            [
                [t.format(p) for p in self.phrases(entry, use) for t in self.templates]
                for entry in self.classes
            ]
        ]

    def describe(self, use: str) -> dict[str, Any]:
        """The record's account of the text: where it came from, which phrases and templates."""
        return {
            "source": self.source,
            "sha256": self.sha256,
            "use": use,
            "templates": list(self.templates),
            "negative_templates": list(self.negative_templates),
            "classes": {e.label: self.phrases(e, use) for e in self.classes},
        }


def class_text_for(info: DatasetInfo, path: str | Path | None = None) -> ClassText:
    """The class text of a dataset: from ``path`` when given, else the built-in record."""
    if path is not None:
        return read_class_text(path, info)
    builtin = _builtin()
    if info.name not in builtin:
        raise ConfigError(
            f"dataset {info.name!r} has no built-in class text (only the MedMNIST datasets "
            "do): write a YAML or JSON file naming its classes and pass class_text=PATH, for "
            f"example:\n{skeleton(info)}"
        )
    return parse_class_text(builtin[info.name], info, f"built-in:{info.name}")


def skeleton(info: DatasetInfo) -> str:
    """A class-text file for ``info`` to fill in (the error for a dataset without text)."""
    lines = ['templates: ["a medical image showing {}."]']
    if info.task is TaskType.MULTILABEL:
        lines.append('negative_templates: ["a medical image with no {}."]')
    lines.append("classes:")
    lines += [f"  {json.dumps(label)}: {{name: ..., description: ...}}" for label in info.labels]
    return "\n".join(lines)


def read_class_text(path: str | Path, info: DatasetInfo) -> ClassText:
    """A user's class-text file (YAML or JSON), checked against the dataset's labels."""
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"class text file {file} does not exist")
    size = file.stat().st_size
    if size == 0:
        raise DataError(f"class text file {file} is empty; see `skeleton` in the README format")
    if size > MAX_FILE_BYTES:
        raise DataError(
            f"class text file {file} is {size} bytes, more than the {MAX_FILE_BYTES} a list of "
            "templates and class phrases needs; is it the right file?"
        )
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"class text file {file} is not UTF-8 text (byte {err.start}); save it as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise DataError(f"class text file {file} is not valid YAML or JSON: {err}") from None
    return parse_class_text(data, info, str(file.resolve()))


def parse_class_text(data: Any, info: DatasetInfo, source: str) -> ClassText:
    """Check one record against the dataset: every label has a class entry and no entry names
    another label; templates hold exactly one ``{}``; every text is a non-empty string."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: class text must be a mapping with {list(_TOP_KEYS)}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; allowed: {list(_TOP_KEYS)}")
    templates = _templates(data.get("templates"), source, "templates", required=True)
    negatives = _templates(data.get("negative_templates"), source, "negative_templates")
    classes = data.get("classes")
    if not isinstance(classes, dict) or not classes:
        raise ConfigError(f"{source}: 'classes' must map each class label to its name/description")
    given = {str(k): v for k, v in classes.items()}
    missing = [label for label in info.labels if label not in given]
    extra = sorted(set(given) - set(info.labels))
    if missing or extra:
        parts = [f"missing class(es) {missing}" if missing else ""]
        parts.append(f"unknown class(es) {extra}" if extra else "")
        raise ConfigError(
            f"{source}: {'; '.join(p for p in parts if p)}; the labels of {info.name} are "
            f"{list(info.labels)}"
        )
    entries = tuple(_entry(label, given[label], source) for label in info.labels)
    canonical = json.dumps(
        {
            "templates": templates,
            "negative_templates": negatives,
            "classes": [[e.label, e.name, e.description] for e in entries],
        },
        sort_keys=True,
    )
    return ClassText(
        templates=tuple(templates),
        classes=entries,
        negative_templates=tuple(negatives),
        source=source,
        sha256=hashlib.sha256(canonical.encode()).hexdigest(),
    )


def _entry(label: str, value: Any, source: str) -> ClassEntry:
    if not isinstance(value, dict):
        raise ConfigError(
            f"{source}: class {label!r} must be a mapping with 'name' and/or 'description', "
            f"got {value!r}"
        )
    unknown = sorted(set(value) - set(_CLASS_KEYS))
    if unknown:
        raise ConfigError(
            f"{source}: class {label!r} has unknown key(s) {unknown}; allowed: {list(_CLASS_KEYS)}"
        )
    name = _text(value.get("name", label), source, f"class {label!r} name")
    description = value.get("description")
    if description is not None:
        description = _text(description, source, f"class {label!r} description")
    return ClassEntry(label, name, description or "")


def _text(value: Any, source: str, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{source}: {what} must be a non-empty string, got {value!r}")
    if len(value) > MAX_TEXT_CHARS:
        raise ConfigError(f"{source}: {what} is {len(value)} characters; keep it a short phrase")
    return value.strip()


def _templates(value: Any, source: str, key: str, *, required: bool = False) -> list[str]:
    if value is None and not required:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{source}: {key} must be a non-empty list of strings with one '{{}}'")
    out = []
    for template in value:
        template = _text(template, source, f"{key} entry")
        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        except ValueError as err:
            raise ConfigError(f"{source}: {key} entry {template!r}: {err}") from None
        if fields != [""]:
            raise ConfigError(
                f"{source}: {key} entry {template!r} must contain exactly one '{{}}' where the "
                "class phrase goes (and no other braces)"
            )
        out.append(template)
    return out


def _builtin() -> dict[str, Any]:
    text = resources.files("clinadapt.data").joinpath(BUILTIN_FILE).read_text(encoding="utf-8")
    return json.loads(text)["datasets"]
