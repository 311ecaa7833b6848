"""Ground truth of generated parts: drawing (component, defect) samples, and scoring a verdict against the truth.

The station (`expertmesh station`), the usage sample (`expertmesh profile --usage sample`) and the accuracy
report (`expertmesh zoo report`) draw and score the same way.
"""

from __future__ import annotations

import numpy as np

from expertmesh.experts.pcb_aoi import generator
from expertmesh.router.plan import Verdict

NO_DEFECT = "ok"  # the generator's defect label of a good part


def sample_pairs(n: int, seed: int, defect_rate: float, mix: dict[str, float] | None = None) -> list[tuple[str, str, int]]:
    """n (component, defect, image index) drawn from the category mix (default uniform) with the given defect rate."""
    rng = np.random.default_rng(seed)
    comps = list(generator.COMPONENTS)
    p = np.array([(mix or {}).get(c, 1.0) for c in comps], dtype=float)
    out = []
    for i in range(n):
        comp = comps[int(rng.choice(len(comps), p=p / p.sum()))]
        defects = [d for d in generator.defects_for(comp) if d != NO_DEFECT]
        defect = defects[int(rng.integers(len(defects)))] if rng.random() < defect_rate else NO_DEFECT
        out.append((comp, defect, i))
    return out


def verdict_correct(verdict: Verdict, defect: str) -> bool:
    """PASS for a good part, DEFECT for a defective one; UNCERTAIN is never correct."""
    return verdict is not Verdict.UNCERTAIN and (verdict is Verdict.PASS) == (defect == NO_DEFECT)


def defect_correct(verdict: Verdict, found: str | None, defect: str) -> bool:
    """The exact defect label (none found counts as `ok`); UNCERTAIN is never correct."""
    return verdict is not Verdict.UNCERTAIN and (found or NO_DEFECT) == defect
