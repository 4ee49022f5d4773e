"""What every bitvit command line shares: one clear line for expected failures, argument checks, and
the provenance (command, machine, date, commit) that every results file records, and how results files are written."""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable


def run(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None,
        several_processes: bool = False) -> int:
    """Call `main(argv)`; a bad path or bad file ends with `error: ...` on stderr and exit code 2. A character
    stdout's encoding lacks (a class or file name on an ASCII terminal) is printed escaped, as on stderr.
    SIGTERM (`timeout`, `kill`) stops it as Ctrl-C does: the temporary file of a write under way is removed (on
    the main thread, the one signals reach; elsewhere it is left as it is). Started by torchrun as one of several
    processes, a command is refused unless it runs in `several_processes` (quant.train): each process would do
    all the work and write the same files; one whose collective fails as another process ended (with its own
    error) ends with one line saying so, not the backend's traceback."""
    commit()  # the code as the command starts, for the results it writes (`provenance`)
    if hasattr(sys.stdout, "reconfigure"):  # not an error after the work, before the results file is written
        sys.stdout.reconfigure(errors="backslashreplace")
    main_thread = threading.current_thread() is threading.main_thread()
    term = signal.signal(signal.SIGTERM, signal.default_int_handler) if main_thread else None
    try:
        if world_size() > 1 and not several_processes:
            raise ValueError("this command runs in one process: start it with python, not torchrun (quant.train is "
                             "the one that trains in several)")
        return main(argv) or 0
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # gloo's, in a collective, where another of torchrun's processes ended: that one says why
        if world_size() > 1 and ("Connection closed by peer" in str(e) or "Connection reset by peer" in str(e)):
            print("stopped: another process of this run failed", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, term)


class HelpFormatter(argparse.HelpFormatter):
    """Every bitvit command's `--help`: an option's default is told after its help, where the help does not
    tell it already (a default of None or False, an option left out, is not told)."""

    def _get_help_string(self, action):
        text, default = action.help, action.default
        # (`is`: a default of 0 is told, though 0 == False)
        if text is None or default is None or default is False or default in ("", [], argparse.SUPPRESS) \
                or action.required or "default" in text.lower():
            return text
        if isinstance(default, (list, tuple)):
            default = " ".join(map(str, default))
        return f"{text} (default: {str(default).replace('%', '%%')})"  # (help is %-formatted)


def world_size() -> int:
    """How many processes torchrun started (`WORLD_SIZE`): 1 where it is unset, or set empty or 0 by another tool
    (`export WORLD_SIZE=$SLURM_NTASKS`, or `$((SLURM_NTASKS))`, with that unset)."""
    world = os.environ.get("WORLD_SIZE", "")
    return max(int(world), 1) if world.isdigit() else 1


def positive_int(text: str) -> int:
    """argparse type for counts (images, threads, epochs, batch sizes): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def counted(n: int, noun: str) -> str:
    """`n` and the noun, singular for one: "1 epoch", "3 epochs"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def max_threads() -> int:
    """The most CPU threads bitvit lets torch or ONNX Runtime use: the machine's logical cores (more only slows
    them down, and thousands hang them)."""
    return os.cpu_count() or 1


def thread_count(text: str) -> int:
    """argparse type for CPU threads: 1 up to `max_threads()`."""
    value, cores = positive_int(text), max_threads()
    if value > cores:
        raise argparse.ArgumentTypeError(f"expected at most {counted(cores, 'thread')} (the machine's logical cores), "
                                         f"got {value}")
    return value


def random_seed(text: str) -> int:
    """argparse type for a random seed: an integer in 0..2**32 - 1 (what numpy's and torch's generators take)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected an integer in 0..{2**32 - 1}, got {value}")
    return value


def number_in(lo: float, hi: float = math.inf, lo_open: bool = False, hi_open: bool = False):
    """argparse type for a finite float between lo and hi (ends included unless open): rates, weights, seconds."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        above = lo < value if lo_open else lo <= value
        below = value < hi if hi_open else value <= hi
        if not (math.isfinite(value) and above and below):  # NaN fails too
            where = (f"{'>' if lo_open else '>='} {lo:g}" if hi == math.inf else
                     f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}")
            raise argparse.ArgumentTypeError(f"expected a number {where}, got {text}")
        return value
    return parse


def mix_alpha(text: str) -> float:
    """argparse type for a mixup or cutmix alpha: one `quant.augment.AugmentConfig` takes (`sound_mix_alpha`)."""
    from quant.augment import MIX_ALPHAS, sound_mix_alpha
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not sound_mix_alpha(value):
        raise argparse.ArgumentTypeError(f"expected a number, {MIX_ALPHAS}, got {text}")
    return value


def finite_number(v) -> bool:
    """Whether a value read from JSON (a results file, a file header) is a real, finite number; True is not, nor
    an integer too large for a float (JSON's 10**400), which every use of the value would turn into one."""
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def is_positive_int(v) -> bool:
    """Whether a value read from JSON is a positive integer; True is not."""
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _check_parents(path: Path) -> None:
    """Refuse a path under an existing file (where making its folder would fail with "File exists")."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{path}: {parent} is a file, not a folder")
            return


def results_file(out: str | None, limit: int | None, shipped: str) -> str:
    """A command's results file: `out`, else `shipped` (results in assets/results, measured on whole splits),
    which a `--limit` dry run must not overwrite."""
    if out is None and limit:
        raise ValueError(f"a --limit dry run needs --out FILE: the default, {shipped}, holds the shipped "
                         f"results on whole splits")
    return out or shipped


def _check_writable(path: Path, folder: Path) -> None:
    """Refuse `path` where `folder`, the folder it goes in, takes no new file (a read-only folder)."""
    tail = f".{os.getpid()}.probe"
    probe = folder / f".{shortened_name(path.name, len(tail) + 1)}{tail}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{path}: cannot write files in {folder} ({e.strerror or e})") from None


def run_folder(path: str | os.PathLike) -> Path:
    """A run's folder, checked before any work is done (not an existing file, nor under one, and where files can
    be written); made later, by the run."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{path} is a file, not a run folder")
    _check_parents(path)
    _check_writable(path, next(p for p in (path, *path.parents) if p.exists()))  # it, or where it will be made
    return path


def file_to_write(path: str | os.PathLike) -> Path:
    """A path a writer may use, checked before it writes: not a folder nor under a file; its folder is made."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name to write")
    _check_parents(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def name_fits(path: str | os.PathLike, shorter: str = "give a shorter name") -> Path:
    """`path`, if its file name fits the file-name limit; else one clear error saying how to give a `shorter` one
    (for a name made from the user's, as `x.safetensors.confusion.png` from `x.safetensors`: the option naming it,
    or a shorter name to make it from)."""
    path = Path(path)
    size = len(os.fsencode(path.name))
    if size > _NAME_MAX:
        raise ValueError(f"{path}: a file name of {size} bytes, more than the {_NAME_MAX} a file system takes; "
                         f"{shorter}")
    return path


def output_file(path: str | os.PathLike, suffix: str, inputs: tuple = ()) -> Path:
    """An output file's path, checked before any work is done: not a folder, named `*{suffix}`, within the
    file-name limit, and not one of the command's `inputs` (a model it reads); its folder is made, and must take a
    new file."""
    path = name_fits(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name to write")
    if path.suffix.lower() != suffix:
        raise ValueError(f"{path}: give a {suffix} file name to write")
    if any(i is not None and Path(i).resolve() == path.resolve() for i in inputs):
        raise ValueError(f"{path} is also this command's input; write the output to another file")
    path = file_to_write(path)
    _check_writable(path, path.parent)  # a read-only folder: refused before the work
    return path


@contextlib.contextmanager
def run_lock(folder: str | os.PathLike):
    """Hold a run's `folder` (made here) for this process while the block runs: another run given it meanwhile
    is refused, as two runs in one folder would log each epoch twice and overwrite each other's resume state. A
    lock on the folder itself, which the OS drops when the process ends, however it ends (none on Windows)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        yield folder
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(f"{folder} is the run folder of another run still going; let it end, or use another "
                             f"run folder") from None
        yield folder
    finally:
        os.close(fd)


def load_average() -> list[float] | None:
    """The 1, 5 and 15-minute load averages, recorded beside CPU timings; None where the OS keeps none
    (Windows)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine() -> str:
    """The machine a result was measured on, in words: CPU model, logical cores, OS, torch, and the GPU
    when one is visible."""
    import torch
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()}, torch {torch.__version__}, {gpu}"


def commit() -> str | None:
    """The bitvit commit a result comes from: $BITVIT_COMMIT where it is set (give it where the code travels
    without its .git, as to the GPU machine), else the checkout's HEAD, "+dirty" when tracked files differ
    from it; None outside a git checkout of its own (code copied without its .git into another repository
    is not that repository's commit). The checkout is read once a process, when `run` starts a command, so
    that a result written after hours of training names the code that trained, not a checkout changed
    meanwhile. Read only: git's optional index refresh is off, so a concurrent git command never finds the
    index locked by it."""
    return os.environ.get("BITVIT_COMMIT") or _checkout_commit()


@functools.cache
def _checkout_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    git = ["git", "--no-optional-locks", "-C", str(root)]
    try:
        top, head = subprocess.run([*git, "rev-parse", "--show-toplevel", "HEAD"], capture_output=True, text=True,
                                   timeout=30, check=True).stdout.splitlines()
        if Path(top).resolve() != root:
            return None
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return head + ("+dirty" if dirty else "")


def utc_now() -> str:
    """The current UTC time to the second, ISO 8601: every results file's date."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def written_whole(path: str | os.PathLike):
    """Yields a temporary path beside `path` to write to, renamed onto `path` when the block ends without
    an error, removed when it fails: `path` is written whole or not at all, should the run be killed
    meanwhile or the machine lose power (on Linux and macOS it is flushed to disk first), and a concurrent reader
    never sees half a file. A failed write (a full disk) names `path`.
    The temporary, `NAME.HOST.PID.tmp`, names the machine (`_process_space`) and process writing it: one that a
    process killed outright (SIGKILL) left is removed by the next write of `path` on that machine, never one of a
    process still running (there, in another container, or on another machine sharing the folder). A NAME too
    long to take the rest within the file-name limit is shortened (`shortened_name`), alike for every process."""
    path = Path(path)
    tmp = temporary_of(path)
    remove_dead_temporaries(path)
    try:
        yield tmp
        if os.name == "posix":  # on disk before the rename, else a power cut may leave `path` renamed but empty
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        if e.errno is None or e.filename not in (None, str(tmp)):
            raise
        raise OSError(e.errno, e.strerror, str(path)) from None  # a write's error names no file, or the temporary
    finally:
        tmp.unlink(missing_ok=True)


_NAME_MAX = 255  # the bytes a file name may have on the usual file systems (ext4, XFS, APFS)
_PID_DIGITS = 10  # the most a process number has (32 bits)


def temporary_of(path: str | os.PathLike) -> Path:
    """This process's temporary beside `path`, `NAME.HOST.PID.tmp` (`written_whole`): a file, or a folder that
    is moved onto `path` whole."""
    path, host = Path(path), _process_space()
    return path.with_name(f"{_temporary_stem(path, host)}.{host}.{os.getpid()}.tmp")


def _temporary_stem(path: Path, host: str) -> str:
    """The start of `path`'s temporaries' names, `NAME` of `NAME.HOST.PID.tmp` (`written_whole`)."""
    return shortened_name(path.name, len(os.fsencode(f".{host}.")) + _PID_DIGITS + len(".tmp"))


def shortened_name(name: str, room: int) -> str:
    """`name`, or where `room` more bytes after it would pass the file-name limit, its start and a digest of the
    whole name: a name of its own for each, that leaves the room."""
    raw = os.fsencode(name)
    if len(raw) + room <= _NAME_MAX:
        return name
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return raw[:_NAME_MAX - room - len(digest) - 1].decode("utf-8", "ignore") + "~" + digest  # (no half character)


def _process_space() -> str:
    """Where a process number names one process: the machine's name and, on Linux, its PID namespace's number
    (containers that share the machine's name, as Docker's --network host gives them, number their own)."""
    try:
        return f"{platform.node()}-{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:  # no /proc: not Linux
        return platform.node()


def remove_dead_temporaries(path: str | os.PathLike) -> None:
    """Remove the temporaries of `path` (`temporary_of`; `written_whole` does this first) left by processes of this
    machine (`_process_space`) that no longer run (killed outright); none on Windows, where signal 0 cannot ask
    whether a process runs. Also for a file written once and then only read, where a child of a process killed
    outright (a compiler) may write its temporary after the write that replaced it had cleared them."""
    if os.name != "posix":  # Windows' os.kill ends the process
        return
    path, host = Path(path), _process_space()
    name = _temporary_stem(path, host)
    temporary = re.compile(re.escape(f"{name}.{host}.") + r"([0-9]+)\.tmp")
    try:
        entries = list(os.scandir(path.parent))
    except OSError:  # no such folder: the write itself says so
        return
    for entry in entries:
        if (m := temporary.fullmatch(entry.name)) is None:
            continue
        try:
            os.kill(int(m[1]), 0)  # signal 0 sends nothing: it asks whether the process exists
        except ProcessLookupError:  # it ended without removing its temporary
            with contextlib.suppress(OSError):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        except (OSError, OverflowError):  # another user's live process, or a number no process has
            pass


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes, read a megabyte at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, data, default=None) -> None:
    """A results file: `data` as indented JSON, written whole or not at all (`written_whole`), its folder
    made first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with written_whole(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, default=default) + "\n")


def write_png(path: str | os.PathLike, fig, dpi: int) -> None:
    """A plot: the matplotlib figure `fig` as a PNG, written whole or not at all (`written_whole`: a run killed
    meanwhile leaves the old plot whole), then closed."""
    import matplotlib.pyplot as plt
    with written_whole(path) as tmp:  # (a .tmp name: the format is named)
        fig.savefig(tmp, dpi=dpi, format="png")
    plt.close(fig)


def provenance(prog: str, argv: list[str] | None) -> dict[str, str]:
    """What every results file records about its run: the command line (`python -m PROG ARGS`), the
    machine, the UTC date and, where it is known, the commit (`commit`)."""
    args = sys.argv[1:] if argv is None else argv
    return {"command": f"python -m {prog} " + shlex.join(args), "machine": machine(),
            "date": utc_now(), **({"commit": c} if (c := commit()) else {})}
