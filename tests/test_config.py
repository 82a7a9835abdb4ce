from dataclasses import dataclass, field

import pytest

from clinadapt.config import from_dict, load_yaml, parse_overrides, to_dict
from clinadapt.data.info import TaskType
from clinadapt.errors import ConfigError


@dataclass
class Example:
    name: str = "x"
    k: int = 3
    temperature: float = 0.1
    flag: bool = False
    grid: list[float] = field(default_factory=lambda: [1.0])
    root: str | None = None
    task: TaskType = TaskType.BINARY


def test_from_dict_coerces_types():
    cfg = from_dict(Example, {"k": 5, "temperature": 1, "grid": 2, "task": "multi-label"})
    assert cfg.k == 5 and cfg.temperature == 1.0 and cfg.grid == [2.0]
    assert cfg.task is TaskType.MULTILABEL


def test_unknown_key_is_an_error_with_suggestion():
    with pytest.raises(ConfigError, match="unknown option 'temprature'.*'temperature'"):
        from_dict(Example, {"temprature": 1.0})


@pytest.mark.parametrize(
    ("key", "value"), [("k", "five"), ("flag", "yes"), ("k", 1.5), ("task", "multilabel")]
)
def test_wrong_types_are_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        from_dict(Example, {key: value})


def test_overrides_are_parsed_as_yaml_scalars_not_evaluated():
    parsed = parse_overrides(["k=10", "name=__import__('os')", "flag=true", "root=null"])
    assert parsed == {"k": 10, "name": "__import__('os')", "flag": True, "root": None}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_yaml_round_trip(tmp_path):
    cfg = Example(k=7, task=TaskType.ORDINAL)
    path = tmp_path / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(to_dict(cfg)))
    assert from_dict(Example, load_yaml(path)) == cfg


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("k: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
