"""A manifest's ``domain`` column: the source of each image, kept per split beside the labels
and part of the data fingerprint; manifests without it have none."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clinadapt.data.local import load_manifest
from clinadapt.errors import DataError


def manifest(tmp_path, rows, header="path,label,domain,split"):
    for i in range(len(rows)):
        Image.fromarray(np.full((4, 4), 10 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
    lines = [header] + [f"{i}.png,{row}" for i, row in enumerate(rows)]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    return tmp_path / "m.csv"


def test_domains_follow_their_rows_into_each_split(tmp_path):
    rows = [
        f"{i % 2},{'ct' if i < 6 else 'mri'},{['train', 'val', 'test'][i % 3]}" for i in range(12)
    ]
    data = load_manifest(manifest(tmp_path, rows), image_size=8)
    assert data["train"].domains.tolist() == ["ct", "ct", "mri", "mri"]
    assert data["test"].domains.tolist() == ["ct", "ct", "mri", "mri"]
    assert len(data["val"].domains) == len(data["val"])
    before = data.provenance["md5"]
    rows[0] = rows[0].replace("ct", "mri")
    assert load_manifest(manifest(tmp_path, rows), image_size=8).provenance["md5"] != before


def test_no_domain_column_gives_none_and_empty_cells_fail(tmp_path):
    rows = [f"{i % 2},{s}" for i, s in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2)]
    plain = load_manifest(manifest(tmp_path, rows, "path,label,split"), image_size=8)
    assert plain["train"].domains is None
    rows = [f"{i % 2},ct,train" for i in range(4)] + ["1,,test"]  # line 6 of the file
    with pytest.raises(DataError, match="line 6: domain is empty"):
        load_manifest(manifest(tmp_path, rows), image_size=8)
