"""Prompt files of ``clinadapt segment``: CSV rows and JSON objects per file, and what is wrong
with a bad one."""

import pytest

from clinadapt.errors import ConfigError, DataError
from clinadapt.runner.prompt_files import read_prompts


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("file,xmin,ymin,xmax,ymax\na.png,1,1,9,9\n", r"unknown columns \['xmin'"),
        ("name,x0,y0,x1,y1\na.png,1,1,9,9\n", "a prompt CSV has a file column"),
        ("file,x0,y0,x1,y1\na.png,1,1,,9\n", "row 2: x1 is empty"),
        ("file,x0,y0,x1,y1\na.png,1,1,9,nine\n", r"row 2: y1 'nine' is not a number"),
        ("file,x,y\na.png,,\n", "row 2 has neither a box nor a point"),
        ("file,x,y\n,3,4\n", "row 2 names no file"),
        ("file,x,y\na.png,3,4,5\n", "row 2 has more cells than the header"),
        ("file,x,y\n", "has no rows"),
    ],
)
def test_bad_prompt_csv_rows_are_named(tmp_path, text, match):
    path = tmp_path / "p.csv"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        read_prompts(path)


def test_prompt_files_read_boxes_points_and_slices(tmp_path):
    table = tmp_path / "p.csv"
    table.write_text(
        "File, X0,y0,z0,x1,y1,z1,x,y,z,label\n"  # headers are trimmed and lower-cased
        "ct.nii.gz,1,2,3,4,5,6,,,,\n"
        "ct.nii.gz,,,,,,,7,8,2,0\n"
        "a.png,1,2,,3,4,,,,,\n"
    )
    assert read_prompts(table) == {
        "ct.nii.gz": {"boxes": [[1, 2, 3, 4, 5, 6]], "points": [[7, 8, 2]], "labels": [0]},
        "a.png": {"boxes": [[1, 2, 3, 4]], "points": [], "labels": []},
    }
    (tmp_path / "p.json").write_text("[1, 2]")
    with pytest.raises(DataError, match=r'expected \{"file.png"'):
        read_prompts(tmp_path / "p.json")
    (tmp_path / "p.txt").write_text("")
    with pytest.raises(ConfigError, match="give a .csv or .json file"):
        read_prompts(tmp_path / "p.txt")
    with pytest.raises(DataError, match="does not exist"):
        read_prompts(tmp_path / "nope.csv")
