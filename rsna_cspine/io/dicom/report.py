"""What a series load repaired: every warning is kept for ``Volume.warnings`` and logged."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("rsna_cspine.io.dicom")

#: At most this many file names are quoted in one message.
MAX_NAMED = 5


@dataclass
class LoadReport:
    """Collects the repairs made while loading one series and logs each one.

    Attributes:
        folder: the series folder (named in every log line).
        messages: the warnings so far, in order.
    """

    folder: Path
    messages: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        self.messages.append(message)
        logger.warning("%s: %s", self.folder, message)


def quote_names(items: Sequence[str]) -> str:
    """The first :data:`MAX_NAMED` items, comma-separated, and how many more there are."""
    shown = ", ".join(items[:MAX_NAMED])
    return shown + (f", ... ({len(items) - MAX_NAMED} more)" if len(items) > MAX_NAMED else "")
