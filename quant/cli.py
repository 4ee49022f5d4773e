"""What every bitvit command line shares: turning expected failures into one clear line."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
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


def positive_int(text: str) -> int:
    """argparse type for counts (images, threads, epochs, batch sizes): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def output_file(path: str | os.PathLike) -> Path:
    """An output file's path, checked before any work is done: not a folder; its folder is made."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name to write")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
