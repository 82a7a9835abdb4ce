import os
import subprocess
import sys


def test_importing_eval_does_not_import_the_methods():
    """Scoring predictions must not register (and import) every adaptation method."""
    code = (
        "import sys, clinadapt.eval; "
        "loaded = sorted(m for m in sys.modules if m.startswith('clinadapt.adapt')); "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
