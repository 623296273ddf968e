"""Boolean settings and flags: one rule for every command line, environment variable and update.conf key.

Rules: what the originals accept, and nothing they would refuse.  update_engine_client's flags follow gflags
(``1 t true y yes`` / ``0 f false n no``, any case); locksmith's flags and ``LOCKSMITHD_*`` variables follow Go's
``strconv.ParseBool`` (``1 t T TRUE true True`` / ``0 f F FALSE false False``), which that set contains.  So
every program takes the gflags set, in any case, with no surrounding spaces; anything else is an error the
caller reports with the name of the setting.  Pure: no I/O.
"""

from __future__ import annotations

TRUE_WORDS: frozenset[str] = frozenset({"1", "t", "true", "y", "yes"})
FALSE_WORDS: frozenset[str] = frozenset({"0", "f", "false", "n", "no"})


def parse_bool(text: str) -> bool:
    """True or False for a boolean word; ValueError naming the text otherwise."""
    lowered = text.lower()
    if lowered in TRUE_WORDS:
        return True
    if lowered in FALSE_WORDS:
        return False
    raise ValueError(f"{text!r} is not a boolean (use true or false)")
