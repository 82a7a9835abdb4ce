import json
import sys

import pytest

from clinadapt._optional import require
from clinadapt.adapt.lora.model import import_peft
from clinadapt.errors import ClinadaptError

MISSING = "clinadapt_no_such_module"


def test_require_returns_the_module():
    assert require("json", extra=None, needed_by="testing") is json


def test_missing_module_names_the_extra():
    with pytest.raises(ClinadaptError) as err:
        require(MISSING, extra="volumes", needed_by="reading test volumes")
    assert str(err.value) == (
        f"reading test volumes needs {MISSING}: pip install 'clinadapt[volumes]'"
    )


def test_missing_module_without_extra_names_the_module():
    with pytest.raises(ClinadaptError, match=f"needs {MISSING}: pip install {MISSING}$"):
        require(MISSING, extra=None, needed_by="testing")


def test_missing_peft_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` fail
    with pytest.raises(ClinadaptError, match="the lora method needs peft: pip install peft"):
        import_peft()
