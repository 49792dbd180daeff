"""What ttrl says on the terminal besides progress bars: warnings, from one process only.
No torch here, so light modules (run directories, data, checkpoints) can warn without loading it."""

from __future__ import annotations

import os
import sys


def is_main_process() -> bool:
    """Rank 0, read from the launcher's environment (usable before any process group exists)."""
    return int(os.environ.get("RANK", "0")) == 0


def warn(message: str) -> None:
    """Every warning ttrl prints: one line on stderr, from rank 0 only (every rank would say the
    same); rich's live progress bar redirects stderr above itself."""
    if is_main_process():
        print(f"warning: {message}", file=sys.stderr)
