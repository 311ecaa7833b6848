"""The import layers point one way and every project import sits at the top of its file (no function-level
imports hiding a cycle). Static: reads the sources with `ast`, imports nothing."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"experts": "expertmesh.experts", "router": "expertmesh.router", "profiler": "expertmesh.profiler",
            "cluster": "expertmesh.cluster", "deployments": "expertmesh.deployments", "expertmesh": "expertmesh"}
COMMANDS = ("expertmesh.cli", "expertmesh.serve_command", "expertmesh.serve_options", "expertmesh.zoo_commands",
            "expertmesh.station")
# what each layer may not import: cluster plans and runs nodes, deployments serve on them (deployments -> cluster),
# the profiler measures models (-> experts), and none of them reaches up into the command line (the cluster commands
# take the light shared options of expertmesh.cli_options)
FORBIDDEN = {
    "expertmesh.experts": ("expertmesh.profiler", "expertmesh.cluster", "expertmesh.deployments",
                           "expertmesh.cli_options", *COMMANDS),
    "expertmesh.router": ("expertmesh.profiler", "expertmesh.cluster", "expertmesh.deployments",
                          "expertmesh.cli_options", *COMMANDS),
    "expertmesh.profiler": ("expertmesh.cluster", "expertmesh.deployments", "expertmesh.cli_options", *COMMANDS),
    "expertmesh.cluster": ("expertmesh.deployments", *COMMANDS),
    "expertmesh.deployments": ("expertmesh.cli_options", *COMMANDS),
}


def sources() -> dict[str, ast.Module]:
    return {f"{folder}/{p.name}": ast.parse(p.read_text(), str(p))
            for folder in PACKAGES for p in sorted((ROOT / folder).glob("*.py"))}


def project_imports(node: ast.AST) -> list[str]:
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return [node.module] if node.module.startswith("expertmesh") else []
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.startswith("expertmesh")]
    return []


def test_project_imports_sit_at_the_top_of_their_files():
    offenders = {}
    for path, tree in sources().items():
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [m for node in ast.walk(fn) for m in project_imports(node)]
                if inner:
                    offenders.setdefault(path, []).extend(inner)
    assert not offenders, offenders


def test_layers_point_one_way():
    wrong = []
    for path, tree in sources().items():
        package = PACKAGES[path.split("/")[0]]
        for node in tree.body:
            for module in project_imports(node):
                if any(module == f or module.startswith(f + ".") for f in FORBIDDEN.get(package, ())):
                    wrong.append(f"{path} imports {module}")
    assert not wrong, wrong
