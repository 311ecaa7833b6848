"""The build step pyproject.toml cannot say: the gRPC stubs (`expertmesh/v1/inspection_pb2*.py`, `.pyi`) are generated
from proto/expertmesh/v1/inspection.proto by every build (`pip install .`, a wheel, an editable install), so a plain
install works with no later step. Everything else about the package is in pyproject.toml."""

from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO = Path("proto/expertmesh/v1/inspection.proto")


def generate_stubs() -> None:
    """protoc (grpcio-tools, a build requirement) writes the stubs into the source tree, where the build finds them."""
    from importlib.resources import files

    from grpc_tools import protoc  # only the build environment has it for sure

    well_known = files("grpc_tools") / "_proto"  # google/protobuf/*.proto, as `python -m grpc_tools.protoc` adds
    args = ["grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"-I{well_known}", f"--python_out={ROOT}", f"--grpc_python_out={ROOT}",
            f"--pyi_out={ROOT}", str(ROOT / PROTO)]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {PROTO}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        generate_stubs()
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
