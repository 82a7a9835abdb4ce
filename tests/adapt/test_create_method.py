import dataclasses

import pytest

from clinadapt.adapt import METHODS, FrozenFeatureMethod, create_method
from clinadapt.errors import ConfigError, UnknownNameError


def test_methods_are_registered_on_import():
    assert {"knn", "prototype", "linear"} <= set(METHODS.names())
    for name in (n for n in METHODS.names() if METHODS.get(n).kind == "frozen"):
        cls = METHODS.get(name)
        assert issubclass(cls, FrozenFeatureMethod) and cls.description
        for f in dataclasses.fields(cls.config_cls):
            assert f.metadata.get("help"), f"{name}.{f.name} has no help text"


def test_options_are_coerced():
    method = create_method("Linear", {"c_grid": [1, 10], "class_weight": "balanced"})
    assert method.config.c_grid == (1.0, 10.0) and method.config.class_weight == "balanced"
    assert create_method("knn").config.k == 20
    assert create_method("knn", {"k": 3}).config.k == 3


def test_unknown_method_suggests_a_name():
    with pytest.raises(UnknownNameError, match="Did you mean 'prototype'"):
        create_method("protoype")


@pytest.mark.parametrize(
    ("name", "options", "match"),
    [
        ("knn", {"kk": 3}, "unknown option 'kk'.*'k'"),
        ("knn", {"k": 0}, "k must be at least 1"),
        ("knn", {"k": "many"}, "integer"),
        ("knn", {"temperature": -1}, "temperature"),
        ("prototype", {"temperature": 0}, "temperature"),
        ("linear", {"class_weight": "auto"}, "balanced"),
        ("linear", {"c_grid": []}, "c_grid"),
        ("linear", {"c_grid": [1, -1]}, "c_grid"),
        ("linear", {"max_iter": 0}, "max_iter"),
    ],
)
def test_invalid_options_are_config_errors(name, options, match):
    with pytest.raises(ConfigError, match=match):
        create_method(name, options)
