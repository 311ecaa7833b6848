"""Which revision a request takes, and whether a canary agreed with the stable revision. Pure.

A canary answers `share` of one factory's requests: the k-th request of that factory goes to it when
floor((k+1) * share) > floor(k * share), so any run of requests holds the share to within one request, with no
randomness to make a test or an incident hard to replay. Each canary request also runs on the stable revision (its
shadow), which is what makes the agreement a like-for-like figure: the same image, both revisions.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class Assignment:
    revision: str  # the spec path whose answer the client gets ("": the built spec)
    shadow: str | None = None  # the stable revision, also run for the agreement (canary requests only)


class CanarySplitter:
    """Counts each factory's requests and sends the canary its share of one factory's."""

    def __init__(self) -> None:
        self._seen: Counter[tuple[str, str]] = Counter()

    def assign(self, factory: str, stable: str, canary: dict | None, coe: str = "") -> Assignment:
        """`coe`: whose canary it is (each CoE's canary counts its factory's requests on its own)."""
        if not canary or factory != canary["factory"]:
            return Assignment(stable)
        k = self._seen[(coe, factory)]
        self._seen[(coe, factory)] += 1
        share = float(canary["share"])
        if math.floor((k + 1) * share) > math.floor(k * share):
            return Assignment(canary["spec"], shadow=stable)
        return Assignment(stable)


def agreement(stable: dict | Exception, canary: dict | Exception) -> str:
    """agree (same verdict and defect), disagree, or failed (either revision ended in an error)."""
    if isinstance(stable, Exception) or isinstance(canary, Exception):
        return "failed"
    same = stable["verdict"] == canary["verdict"] and stable["defect"] == canary["defect"]
    return "agree" if same else "disagree"
