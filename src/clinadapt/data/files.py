"""File plumbing for datasets: md5 checksums, writable folders and atomic downloads."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import stat
import tempfile
from pathlib import Path
from urllib.request import urlopen

from tqdm import tqdm

from clinadapt.errors import DataError
from clinadapt.paths import cache_home

CHUNK = 1 << 20
# Files at least this large get their md5 remembered on disk: re-hashing a multi-GB MedMNIST
# file on every run costs tens of seconds, small files hash faster than a cache lookup is worth.
MEMO_MIN_BYTES = 64 << 20


def is_writable_dir(path: Path) -> bool:
    """True when we may write into ``path``.

    Honours read-only mode bits even for root, which ``os.access`` alone ignores: shared data
    folders are often marked read-only rather than mounted read-only.
    """
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    any_write = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    return path.is_dir() and bool(mode & any_write) and os.access(path, os.W_OK)


def atomic_write_text(path: Path, text: str) -> None:
    """Write through a temp file and ``os.replace`` so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def md5_file(path: Path) -> str:
    """MD5 of a file; for large files remembered by (path, bytes, mtime) in the cache folder."""
    st = path.stat()
    stamp = {"path": str(path.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    memo = cache_home() / "md5" / (hashlib.sha1(stamp["path"].encode()).hexdigest() + ".json")
    if st.st_size >= MEMO_MIN_BYTES:
        try:
            saved = json.loads(memo.read_text())
            if all(saved.get(k) == v for k, v in stamp.items()):
                return str(saved["md5"])
        except (OSError, ValueError, KeyError):
            pass
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    result = digest.hexdigest()
    if st.st_size >= MEMO_MIN_BYTES:
        with contextlib.suppress(OSError):  # an unwritable cache only costs re-hashing later
            atomic_write_text(memo, json.dumps({**stamp, "md5": result}))
    return result


def download(url: str, dest: Path, md5: str | None, *, hint: str) -> None:
    """Fetch ``url`` to ``dest`` via a temp file in the same folder.

    The temp file is removed on any failure (Ctrl-C included) and only a complete file with the
    expected md5 is moved into place, so a file at ``dest`` is never a partial download.
    ``hint`` tells the user how to provide the file by hand when this machine is offline.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.md5(usedforsecurity=False)
        with os.fdopen(fd, "wb") as out, urlopen(url, timeout=60) as response:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=dest.name, disable=None) as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if md5 is not None and digest.hexdigest() != md5:
            raise DataError(
                f"Downloaded {url} but its md5 is {digest.hexdigest()}, not the official {md5}: "
                f"the transfer was corrupted or the file changed upstream. Nothing was saved to "
                f"{dest}; try again. {hint}"
            )
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except (OSError, http.client.HTTPException) as err:  # URLError and timeouts are OSErrors
        raise DataError(f"Could not download {url} to {dest} ({err}). {hint}") from None
    finally:
        tmp.unlink(missing_ok=True)
