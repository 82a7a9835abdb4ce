from clinadapt.backbones.weights import file_sha256
from clinadapt.data import files
from clinadapt.engine import default_cache_root
from clinadapt.paths import cache_home


def test_cache_home_defaults_to_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("CLINADAPT_CACHE")
    assert cache_home() == tmp_path / ".cache" / "clinadapt"
    monkeypatch.setenv("CLINADAPT_CACHE", "")
    assert cache_home() == tmp_path / ".cache" / "clinadapt"


def test_every_cache_user_expands_tilde(tmp_path, monkeypatch):
    """``CLINADAPT_CACHE=~/c`` means the home folder's ``c``, never a folder named ``~``."""
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("CLINADAPT_CACHE", "~/c")
    monkeypatch.chdir(work)
    assert cache_home() == home / "c"
    assert default_cache_root() == home / "c" / "features"
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"w")
    file_sha256(weights)
    assert len(list((home / "c" / "hashes").glob("*.json"))) == 1
    monkeypatch.setattr(files, "MEMO_MIN_BYTES", 1)  # remember the md5 of any file
    files.md5_file(weights)
    assert len(list((home / "c" / "md5").glob("*.json"))) == 1
    assert list(work.iterdir()) == []


def test_caches_write_files_with_the_umask_mode(tmp_path, monkeypatch):
    import os
    import stat

    import numpy as np

    from clinadapt.engine.cache import FeatureCache

    monkeypatch.setenv("CLINADAPT_CACHE", str(tmp_path / "cache"))
    old = os.umask(0o027)
    try:
        FeatureCache(tmp_path / "features").get_or_compute({"a": 1}, lambda: np.ones((2, 3)))
        weights = tmp_path / "w.bin"
        weights.write_bytes(b"weights")
        file_sha256(weights)
    finally:
        os.umask(old)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and p != weights]
    assert len(written) >= 3  # feature array, its sidecar, the hash memo
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {0o640}
