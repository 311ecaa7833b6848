"""A plain build gives a working package: the wheel built from the repository's tracked files alone (no stubs
generated beforehand, as on a fresh clone) carries the gRPC stubs that setup.py generates from proto/, and the stubs
it carries import and name the service."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = ("expertmesh/v1/inspection_pb2.py", "expertmesh/v1/inspection_pb2_grpc.py", "expertmesh/v1/inspection_pb2.pyi")


@pytest.mark.slow
def test_a_plain_build_generates_the_grpc_stubs(tmp_path):
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files"], capture_output=True, text=True, check=True)
    src = tmp_path / "src"
    for rel in tracked.stdout.splitlines():
        if (ROOT / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, src / rel)
    assert not any((src / s).exists() for s in STUBS)  # generated files are not tracked
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"),
                          str(src)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("expertmesh-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert set(STUBS) <= names, sorted(n for n in names if n.startswith("expertmesh/v1/"))
        assert b"InspectionService" in z.read("expertmesh/v1/inspection_pb2_grpc.py")
        z.extractall(tmp_path / "wheel")
    # the wheel's stubs import on their own (grpc and protobuf are this environment's, the versions pinned)
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib.util as u; "
             "spec = u.spec_from_file_location('stub', sys.argv[1] + '/expertmesh/v1/inspection_pb2.py'); "
             "m = u.module_from_spec(spec); spec.loader.exec_module(m); "
             "print(m.DESCRIPTOR.services_by_name['InspectionService'].full_name)")
    ran = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "wheel")], capture_output=True, text=True,
                         timeout=120)
    assert ran.stdout.strip() == "expertmesh.v1.InspectionService", ran.stderr[-2000:]
