"""Memory measurements for the streaming tests: resident pages of a mapped file, and the peak
memory a piece of code adds in a fresh process (Linux /proc; the tests skip elsewhere)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import clinadapt

SOURCE = str(Path(clinadapt.__file__).resolve().parents[1])


def mapped_kib(path: Path) -> int | None:
    """Resident KiB of this process's mappings of ``path`` (None without /proc/self/smaps)."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    total, inside = 0, False
    for line in lines:
        if not line.split()[0].endswith(":"):  # a mapping's header line: address range ... path
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


PEAK = """
def vm_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
"""


def peak_growth_mib(setup: str, measured: str) -> float:
    """MiB by which the peak resident memory of a fresh Python process rises above its resident
    memory after ``setup`` while it runs ``measured`` (both Python source). The peak is reset
    after ``setup`` (``/proc/self/clear_refs``), so imports do not count."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs /proc/self/clear_refs (Linux) to measure peak memory")
    script = "\n".join(
        [
            "import json",
            PEAK,
            textwrap.dedent(setup),
            "open('/proc/self/clear_refs', 'w').write('5')",
            "now = vm_kib('VmRSS')",
            textwrap.dedent(measured),
            "print(json.dumps((vm_kib('VmHWM') - now) / 1024))",
        ]
    )
    env = {**os.environ, "PYTHONPATH": SOURCE, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return float(json.loads(done.stdout.strip().splitlines()[-1]))
