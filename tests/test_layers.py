"""The package's layers, checked by import-linter (contracts in pyproject.toml)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_imports_flow_one_way_through_the_layers():
    lint = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint), "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_the_product_never_imports_kafka_python_or_the_dev_tools():
    for path in (ROOT / "streamgmm").rglob("*.py"):
        if "dev" in path.relative_to(ROOT / "streamgmm").parts:
            continue
        text = path.read_text()
        assert "import kafka\n" not in text and "from kafka " not in text and "from kafka." not in text, path
        assert "streamgmm.dev" not in text and "from ..dev" not in text, path


def test_the_package_gives_the_library_at_first_use():
    # The package imports numpy and scipy only when a library name is used (the container's
    # healthcheck needs none of them); streamgmm.mixture, dir() and star imports work as before.
    probe = ("import sys, streamgmm; assert 'numpy' not in sys.modules; "
             "assert {'GaussianMixture', 'OnlineGaussianMixture', 'mixture'} <= set(dir(streamgmm)); "
             "assert streamgmm.mixture.GaussianMixture is streamgmm.GaussianMixture; "
             "from streamgmm import *; assert OnlineGaussianMixture.__module__ == 'streamgmm.mixture.online'")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
