"""The figures inspection engineers judge a line by, from verdicts and the truth (pure).

* escape rate: of the defective parts, the share the CoE passed (a defect that leaves the line);
* false-call rate: of the good parts, the share it did not pass (DEFECT or UNCERTAIN: each costs a person's look);
* the confusion matrix: truth (good, defective) against verdict (PASS, UNCERTAIN, DEFECT), in counts.
"""

from __future__ import annotations

from collections.abc import Sequence

from expertmesh.router.plan import Verdict

TRUTHS = ("good", "defective")
VERDICTS = tuple(v.value for v in (Verdict.PASS, Verdict.UNCERTAIN, Verdict.DEFECT))
HEADER = "truth \\ verdict"


def line_figures(verdicts: Sequence[Verdict], is_defect: Sequence[bool]) -> dict:
    """{escape_rate, false_call_rate, confusion}; a rate is None when there is no part of its kind."""
    confusion = {t: {v: 0 for v in VERDICTS} for t in TRUTHS}
    for verdict, defect in zip(verdicts, is_defect):
        confusion[TRUTHS[bool(defect)]][Verdict(verdict).value] += 1
    n_def, n_good = sum(confusion["defective"].values()), sum(confusion["good"].values())
    return {"escape_rate": confusion["defective"]["PASS"] / n_def if n_def else None,
            "false_call_rate": (n_good - confusion["good"]["PASS"]) / n_good if n_good else None,
            "confusion": confusion}


def confusion_lines(figures: dict) -> list[str]:
    """The escape and false-call rates and the confusion matrix as text lines (empty when not measured)."""
    confusion = figures.get("confusion")
    if not confusion:
        return []
    rate = lambda x: "-" if x is None else f"{x:.4f}"  # noqa: E731
    lines = [f"escape rate (defects passed) {rate(figures.get('escape_rate'))}, false-call rate (good parts not "
             f"passed) {rate(figures.get('false_call_rate'))}",
             f"{HEADER:<18}" + "".join(f"{v:>11}" for v in VERDICTS)]
    lines += [f"{t:<18}" + "".join(f"{confusion[t][v]:>11}" for v in VERDICTS) for t in TRUTHS]
    return lines
