"""Trial counts of the fault tests, gathered per fault class and printed at the end of the session.

Each fault test adds what it did with :func:`record`: how many faults it injected or hostile inputs it sent
(``trials``), how many of those inputs were refused with the expected error (``refused``), and after how many the
system was still in a state the test accepts (``survived``). ``tests/faults/conftest.py`` prints the table, so the
README's reliability section can quote the figures of a real run.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FaultFigures:
    fault_class: str
    trials: int = 0
    refused: int | None = None  # None: the fault class has nothing to refuse (a crash, a power cut)
    survived: int = 0
    notes: list[str] | None = None


FIGURES: dict[str, FaultFigures] = {}


def record(
    fault_class: str, *, trials: int, refused: int | None = None, survived: int = 0, note: str = ""
) -> None:
    """Add one test's counts to ``fault_class`` (several tests may contribute to one class)."""
    figures = FIGURES.setdefault(fault_class, FaultFigures(fault_class))
    figures.trials += trials
    if refused is not None:
        figures.refused = (figures.refused or 0) + refused
    figures.survived += survived
    if note:
        figures.notes = [*(figures.notes or []), note]


def table() -> list[str]:
    """The figures as aligned text lines, one per fault class, in the order the classes were first recorded."""
    if not FIGURES:
        return []
    width = max(len("fault class"), *(len(name) for name in FIGURES))
    lines = [f"{'fault class':<{width}}  {'trials':>7}  {'refused':>7}  {'survived':>8}"]
    for figures in FIGURES.values():
        refused = "-" if figures.refused is None else str(figures.refused)
        lines.append(f"{figures.fault_class:<{width}}  {figures.trials:>7}  {refused:>7}  {figures.survived:>8}")
        for note in figures.notes or []:
            lines.append(f"{'':<{width}}    {note}")
    return lines
