"""Where ExpertMesh keeps its files by default: `$EXPERTMESH_HOME`, else `~/.cache/expertmesh`.

The one place this default is decided: the zoo (`<home>/zoo/<spec>`), the local cluster's state, the dev
tokens and the benchmark's tokens all live under it, so `make run` and a hand-run `expertmesh` find the same files.
"""

from __future__ import annotations

import os
from pathlib import Path

HOME_ENV = "EXPERTMESH_HOME"


def expertmesh_home() -> Path:
    """`$EXPERTMESH_HOME` when set (and not empty), else `~/.cache/expertmesh`; not created here."""
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "expertmesh")
