import os
import subprocess
import sys


def test_importing_the_methods_and_the_engine_does_not_import_timm():
    """timm takes seconds to import: only building a backbone should pay for it."""
    code = (
        "import sys, clinadapt.adapt, clinadapt.engine; "
        "assert 'timm' not in sys.modules, 'timm imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ))
