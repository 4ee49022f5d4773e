"""What every bitvit command line shares: turning expected failures into one clear line."""
from __future__ import annotations

import sys
from typing import Callable


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call `main(argv)`; a bad path or bad file ends with `error: ...` on stderr and exit code 2."""
    try:
        return main(argv) or 0
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
