"""Class text: the built-in record of every MedMNIST dataset and users' class-prompt files."""

import json

import pytest

from clinadapt.data import DATASETS
from clinadapt.data.class_text import _builtin, class_text_for, read_class_text
from clinadapt.data.info import DatasetInfo, TaskType
from clinadapt.data.synthetic import PRESETS
from clinadapt.errors import ConfigError, DataError

MEDMNIST = [
    n
    for n in DATASETS.names()
    if n not in PRESETS and DATASETS.get(n).task is not TaskType.SEGMENTATION
]
SKIN = DatasetInfo("skin", TaskType.BINARY, ("melanoma", "nevus"), 3, 2)


def test_every_medmnist_dataset_and_class_has_text():
    assert len(MEDMNIST) == 18 and set(_builtin()) == set(MEDMNIST)
    for name in MEDMNIST:
        info = DATASETS.get(name)
        text = class_text_for(info)
        assert [e.label for e in text.classes] == list(info.labels)
        assert all(e.name and e.description for e in text.classes), name
        assert len({e.name for e in text.classes}) == info.num_classes, f"{name}: names repeat"
        assert text.templates and all(t.count("{}") == 1 for t in text.templates)
        heads = text.prompts(info.task, "both")
        if info.task is TaskType.MULTILABEL:
            assert text.negative_templates and len(heads) == info.num_classes
            assert all(len(options) == 2 for options in heads)
        else:
            assert len(heads) == 1 and len(heads[0]) == info.num_classes
        assert text.source == f"built-in:{name}" and len(text.sha256) == 64


def test_prompts_fill_templates_with_names_descriptions_or_both():
    text = class_text_for(DATASETS.get("breastmnist"))
    names = text.prompts(TaskType.BINARY, "names")[0]
    assert names[0] == [t.format("a malignant tumour") for t in text.templates]
    both = text.prompts(TaskType.BINARY, "both")[0]
    assert len(both[1]) == 2 * len(text.templates)
    assert text.prompts(TaskType.BINARY, "descriptions")[0][0][0].startswith(
        "a breast ultrasound image of an irregular"
    )
    chest = class_text_for(DATASETS.get("chestmnist")).prompts(TaskType.MULTILABEL)
    assert chest[1][0][0] == "a chest X-ray with no cardiomegaly."
    assert chest[1][1][0] == "a chest X-ray showing cardiomegaly."
    with pytest.raises(ConfigError, match="text must be one of"):
        text.prompts(TaskType.BINARY, "captions")


def write(tmp_path, content, name="classes.yaml"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def test_user_file_in_yaml_or_json(tmp_path):
    yaml_file = write(
        tmp_path,
        'templates: ["a dermoscopy image of {}."]\nclasses:\n'
        "  melanoma: {description: an irregular lesion}\n"
        "  nevus: {name: a benign mole, description: a symmetric mole}\n",
    )
    text = read_class_text(yaml_file, SKIN)
    assert [e.name for e in text.classes] == ["melanoma", "a benign mole"]  # name defaults
    assert text.source == str(yaml_file.resolve())
    json_file = write(
        tmp_path,
        {
            "templates": ["a dermoscopy image of {}."],
            "classes": {
                "nevus": {"name": "a benign mole", "description": "a symmetric mole"},
                "melanoma": {"description": "an irregular lesion"},
            },
        },
        "classes.json",
    )
    same = read_class_text(json_file, SKIN)
    assert same.sha256 == text.sha256  # the same content, in label order
    assert class_text_for(SKIN, json_file).classes == text.classes


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ({"templates": ["a {}"], "classes": {"melanoma": {}}}, r"missing class\(es\) \['nevus'\]"),
        (
            {"templates": ["a {}"], "classes": {"melanoma": {}, "nevus": {}, "wart": {}}},
            r"unknown class\(es\) \['wart'\].*labels of skin are \['melanoma', 'nevus'\]",
        ),
        ({"templates": ["a {}"], "classes": {"melanoma": {}, "nevus": {"nme": "x"}}}, "nme"),
        ({"template": ["a {}"], "classes": {}}, r"unknown key\(s\) \['template'\]"),
        ({"templates": [""], "classes": {"melanoma": {}, "nevus": {}}}, "non-empty string"),
        ({"templates": [], "classes": {"melanoma": {}, "nevus": {}}}, "non-empty list"),
        ({"templates": ["an image"], "classes": {"melanoma": {}, "nevus": {}}}, "exactly one"),
        ({"templates": ["{} and {}"], "classes": {"melanoma": {}, "nevus": {}}}, "exactly one"),
        ({"templates": ["a {name}"], "classes": {"melanoma": {}, "nevus": {}}}, "exactly one"),
        ({"templates": ["a {"], "classes": {"melanoma": {}, "nevus": {}}}, "Single '{'"),
        ({"templates": ["a {}"], "classes": {"melanoma": "x", "nevus": {}}}, "must be a mapping"),
        ({"templates": ["a {}"], "classes": {"melanoma": {"name": 3}, "nevus": {}}}, "name"),
        (["a {}"], "must be a mapping"),
    ],
)
def test_bad_user_files_name_the_problem(tmp_path, content, match):
    with pytest.raises(ConfigError, match=match):
        read_class_text(write(tmp_path, content), SKIN)


def test_empty_huge_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(DataError, match="is empty"):
        read_class_text(write(tmp_path, ""), SKIN)
    huge = tmp_path / "huge.yaml"
    huge.write_text("# " + "x" * (1 << 20))
    with pytest.raises(DataError, match="more than"):
        read_class_text(huge, SKIN)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes('templates: ["une échographie de {}"]'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_class_text(latin, SKIN)
    with pytest.raises(DataError, match="does not exist"):
        read_class_text(tmp_path / "nope.yaml", SKIN)
    with pytest.raises(DataError, match="not valid YAML"):
        read_class_text(write(tmp_path, "templates: [unclosed"), SKIN)


def test_dataset_without_text_names_the_file_to_write():
    with pytest.raises(ConfigError, match="class_text=PATH") as err:
        class_text_for(SKIN)
    assert '"melanoma": {name: ..., description: ...}' in str(err.value)


def test_missing_description_or_negative_templates_fail_when_used(tmp_path):
    text = read_class_text(
        write(tmp_path, {"templates": ["a {}"], "classes": {"melanoma": {}, "nevus": {}}}), SKIN
    )
    assert text.prompts(TaskType.BINARY, "names")[0][0] == ["a melanoma"]
    with pytest.raises(ConfigError, match="'melanoma' has no description"):
        text.prompts(TaskType.BINARY, "descriptions")
    with pytest.raises(ConfigError, match="negative_templates"):
        text.prompts(TaskType.MULTILABEL)
