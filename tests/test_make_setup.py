"""`make setup` on fresh machines, checked without installing anything: the torch steps it would run (offline first,
then PyTorch's CPU index) and the clear stop where Python cannot create a virtual environment."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def make(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=60)


def dry_setup(tmp_path: Path, *args: str) -> str:
    venv = tmp_path / "venv"
    out = make("-n", f"VENV={venv}", *args, f"{venv}/.installed")
    assert out.returncode == 0, out.stderr
    return out.stdout


def pinned_torch() -> str:
    pins = [line for line in (ROOT / "constraints-cpu.txt").read_text().splitlines() if line.startswith("torch==")]
    assert len(pins) == 1, pins
    return pins[0].removeprefix("torch==")


def test_torch_comes_from_a_local_wheel_first_then_from_the_cpu_index(tmp_path):
    text = dry_setup(tmp_path)
    version = pinned_torch().removesuffix("+cpu")  # constraints-cpu.txt pins the build: torch==<version>+cpu
    offline = text.index(f'pip install --quiet --no-index --no-deps "torch=={version}"')
    fallback = re.search(rf'pip install --quiet "torch=={re.escape(version)}" '
                         r"--index-url https://download\.pytorch\.org/whl/cpu --extra-index-url https://pypi\.org/simple",
                         text)
    assert fallback and offline < fallback.start() < text.index("pip install --quiet -e '.[test]'")


def test_other_constraints_fall_back_to_the_configured_indexes(tmp_path):
    text = dry_setup(tmp_path, "CONSTRAINTS=constraints-cuda.txt")
    assert "--no-index --no-deps" in text and "download.pytorch.org" not in text and "--index-url" not in text


def test_a_python_without_venv_support_stops_with_the_package_to_install(tmp_path):
    """Debian without python3-venv has no ensurepip: simulated by shadowing the module."""
    shadow = tmp_path / "shadow" / "ensurepip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('ensurepip is not available')\n")
    venv = tmp_path / "venv"
    out = make(f"VENV={venv}", f"{venv}/.installed", env={"PYTHONPATH": str(shadow.parent)})
    assert out.returncode != 0
    assert "cannot create a virtual environment" in out.stderr and "apt-get install python3-venv" in out.stderr
    assert not venv.exists()
