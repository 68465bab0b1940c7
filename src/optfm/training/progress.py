"""Progress bars (tqdm) with ETA that stay quiet when stderr is not a TTY or when asked.

``set_quiet(True)`` (the CLI's ``--quiet``) or ``OPTFM_QUIET=1`` silences every bar.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["is_quiet", "progress", "set_quiet"]

_quiet: bool | None = None


def set_quiet(quiet: bool | None) -> None:
    """Force progress output off (True), on (False), or back to automatic (None)."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    """True when progress bars should not be shown."""
    if _quiet is not None:
        return _quiet
    if os.environ.get("OPTFM_QUIET", "").lower() in ("1", "true", "yes"):
        return True
    return not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())


def progress(iterable: Iterable | None = None, *, total: int | None = None,
             desc: str | None = None, unit: str = "it", leave: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar (with ETA) that is disabled when :func:`is_quiet`."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave,
                disable=is_quiet(), dynamic_ncols=True, **kwargs)
