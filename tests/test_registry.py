import pytest

from clinadapt.errors import UnknownNameError
from clinadapt.registry import Registry


def make() -> Registry[int]:
    reg: Registry[int] = Registry("thing")
    reg.register("dinov2_vits14", 1)
    reg.register("dinov2_vitb14", 2)
    reg.register("resnet18", 3)
    return reg


def test_get_is_case_insensitive():
    assert make().get("ResNet18") == 3


def test_unknown_name_suggests_close_names():
    with pytest.raises(UnknownNameError) as err:
        make().get("resnet19")
    assert "Did you mean 'resnet18'" in str(err.value)
    assert "clinadapt things" in str(err.value)


def test_wildcard_listing():
    assert make().names("dino*") == ["dinov2_vitb14", "dinov2_vits14"]
    assert make().names() == ["dinov2_vitb14", "dinov2_vits14", "resnet18"]


def test_duplicate_and_uppercase_names_are_rejected():
    reg = make()
    with pytest.raises(ValueError, match="already registered"):
        reg.register("resnet18", 4)
    with pytest.raises(ValueError, match="lower-case"):
        reg.register("ResNet50", 4)


def test_decorator_form():
    reg: Registry[type] = Registry("method")

    @reg.register("mine")
    class Mine:
        pass

    assert reg.get("mine") is Mine
