"""Build bitvit's ONNX Runtime custom-op library (`export/ops/bitvit_ops.cc`) from source, once per machine.

`library_path()` returns the path of `libbitvit_ops.so`, compiling it on first use with
`-O3 -march=native` (by `$CXX`, a command with its arguments, e.g. `ccache g++`; else `g++`) into
`<cache>/<hash>/<compiler hash>/`, where `<cache>` is `$BITVIT_ORTOPS_CACHE`, else
`$BITVIT_CACHE/ortops`, else `~/.cache/bitvit/ortops`, and the hash covers the source, the flags, ONNX
Runtime's C API header and the CPU; without a compiler, one built earlier by any compiler serves. A
`-march=native` binary only runs safely on the CPU that built it, so none is ever committed. On Apple
silicon it is built without `-march=native` (Apple clang before 15 refuses it there); on Windows it is not
built, and models run on ONNX Runtime's standard ops.
`python -m export.ortops` builds it and prints the path and the kernel it runs.

ONNX Runtime's C/C++ API headers are not in the pip wheel. They come from `$ORT_INCLUDE_DIR` when set,
else from Debian trixie's `libonnxruntime-dev` package: apt-get downloads it into a private folder,
using this machine's own Debian archive and keyring with the suite set to trixie (the system's apt
configuration and packages are untouched) and `dpkg-deb -x` unpacks it. Headers may be older than the
runtime that loads the library, never newer.
"""
from __future__ import annotations

import argparse
import ctypes
import functools
import getpass
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from quant.cli import HelpFormatter, file_sha256, remove_dead_temporaries, temporary_of, written_whole
from quant.data import cache_dir

SOURCE = Path(__file__).with_name("ops") / "bitvit_ops.cc"
LIB_NAME = "libbitvit_ops.so"
DOMAIN = "bitvit"
DOMAIN_VERSION = 1  # the version of the domain the library's ops implement
ISAS = {"native": [], "avx2": ["-DBITVIT_FORCE_AVX2"], "portable": ["-DBITVIT_FORCE_PORTABLE"]}
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden"]
CPUINFO = Path("/proc/cpuinfo")  # Linux's CPU features: x86's "flags" line, Arm's "Features"


def cache_root() -> Path:
    if os.environ.get("BITVIT_ORTOPS_CACHE"):
        return Path(os.environ["BITVIT_ORTOPS_CACHE"]).expanduser()
    return cache_dir() / "ortops"


def library_path(isa: str = "native", force: bool = False) -> Path:
    """The custom-op library for this machine, built first if needed.

    `isa` picks the kernel: "native" (AVX-512 VNNI, else AVX2, else the portable one, as the compiler targets
    here: portable on an Arm CPU), or forces the "avx2" or "portable" one (for tests and comparisons).
    """
    if isa not in ISAS:
        raise ValueError(f"unknown isa {isa!r}; choose one of {', '.join(ISAS)}")
    if sys.platform == "win32":  # its build (flags, exports, header download) is Linux's and macOS's
        raise FileNotFoundError("bitvit's ONNX Runtime ops are built on Linux and macOS, not on Windows; run "
                                "models on ONNX Runtime's standard ops (python -m export --standard-ops)")
    cxx = shlex.split(os.environ.get("CXX") or "g++")  # a command with arguments too, e.g. "ccache g++"
    no_compiler = FileNotFoundError(f"no C++ compiler {os.environ.get('CXX') or 'g++'!r} to build bitvit's ONNX "
                                    f"Runtime ops (install g++, or set CXX)")
    compiler = bool(cxx) and shutil.which(cxx[0]) is not None
    if not compiler and not (_include_dir() / "onnxruntime_c_api.h").is_file():  # nothing built here: fetch nothing
        raise no_compiler
    include = _headers()
    flags = FLAGS + ISAS[isa]
    if sys.platform == "darwin" and platform.machine() == "arm64":  # Apple clang before 15 refuses it there, and
        flags.remove("-march=native")                                 # its default target has the NEON it needs
    folder = cache_root() / _build_key(tuple(flags), include)
    if not compiler:  # a library that a compiler since removed built serves
        built = [lib for lib in sorted(folder.glob(f"*/{LIB_NAME}")) if _intact(lib)]
        if built and not force:
            return built[0]
        raise no_compiler
    out = folder / _compiler_key(tuple(cxx)) / LIB_NAME
    remove_dead_temporaries(out)  # one a killed build's compiler wrote after the build that replaced it began
    if _intact(out) and not force:
        return out
    digest = out.with_name(LIB_NAME + ".sha256")
    out.parent.mkdir(parents=True, exist_ok=True)
    print("compiling bitvit's ONNX Runtime ops (once for this machine; 10 s to a minute)...", file=sys.stderr)
    with written_whole(out) as tmp:  # a concurrent build never sees a half-written library
        _run([*cxx, *flags, f"-I{include}", str(SOURCE), "-o", str(tmp)], what="compiling bitvit's ONNX Runtime ops")
        if not tmp.is_file():  # a "compiler" that exits 0 without writing (CXX=true)
            raise ValueError(f"the compiler {shlex.join(cxx)} wrote no library (is $CXX a C++ compiler?)")
        sha = file_sha256(tmp)
    with written_whole(digest) as tmp:
        tmp.write_text(sha)
    return out


# Each computed once a process (the app and export.bench open many sessions, each asking for the library); a
# process started after the source, the headers or the compiler changed builds anew.
@functools.cache
def _build_key(flags: tuple[str, ...], include: Path) -> str:
    """The library's cache folder name: a hash of the source, the flags, ONNX Runtime's C API header and the CPU."""
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(flags).encode(), (include / "onnxruntime_c_api.h").read_bytes(),
                 _cpu_signature().encode()):
        key.update(part)
    return key.hexdigest()[:16]


@functools.cache
def _compiler_key(cxx: tuple[str, ...]) -> str:
    """The compiler's sub-folder name: a hash of what `cxx --version` prints."""
    return hashlib.sha256(_run([*cxx, "--version"]).encode()).hexdigest()[:16]


def _intact(lib: Path) -> bool:
    """Whether a cached library is whole: a damaged one is rebuilt, never loaded."""
    digest = lib.with_name(LIB_NAME + ".sha256")
    return lib.is_file() and digest.is_file() and digest.read_text() == file_sha256(lib)


def kernel_isa(path: str | os.PathLike) -> str:
    """The kernel a built library runs: "avx512-vnni", "avx2" or "portable"."""
    lib = ctypes.CDLL(str(path))
    lib.bitvit_ops_isa.restype = ctypes.c_char_p
    return lib.bitvit_ops_isa().decode()


_FETCHING = threading.Lock()  # a process's threads share the folder a fetch unpacks into (temporary_of)


def _headers() -> Path:
    """The folder holding `onnxruntime_cxx_api.h`, fetched once into the cache."""
    include = _include_dir()
    if os.environ.get("ORT_INCLUDE_DIR"):
        if not (include / "onnxruntime_cxx_api.h").is_file():
            raise FileNotFoundError(f"ORT_INCLUDE_DIR={include} holds no onnxruntime_cxx_api.h")
        return _check_api_version(include)
    with _FETCHING:
        if not (include / "onnxruntime_cxx_api.h").is_file():
            print("downloading ONNX Runtime's headers to build bitvit's ops (once)...", file=sys.stderr)
            _fetch_headers(cache_root() / "headers")
    return _check_api_version(include)


def _include_dir() -> Path:
    """Where ONNX Runtime's headers are: `$ORT_INCLUDE_DIR`, else the cache's copy (maybe not fetched yet)."""
    if os.environ.get("ORT_INCLUDE_DIR"):
        return Path(os.environ["ORT_INCLUDE_DIR"])
    return cache_root() / "headers" / "usr" / "include" / "onnxruntime"


def _check_api_version(include: Path) -> Path:
    import onnxruntime
    text = (include / "onnxruntime_c_api.h").read_text(errors="replace")
    found = re.search(r"#define ORT_API_VERSION (\d+)", text)
    runtime = int(onnxruntime.__version__.split(".")[1])  # ORT 1.x serves C API versions up to x
    if found is None or int(found.group(1)) > runtime:
        raise ValueError(f"the ONNX Runtime headers in {include} are newer than the installed "
                         f"onnxruntime {onnxruntime.__version__}; use headers of API version <= {runtime}")
    return include


def _fetch_headers(dest: Path) -> None:
    uris, keyring = _debian_archive()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "parts").mkdir()
        (tmp / "lists" / "partial").mkdir(parents=True)
        (tmp / "cache" / "archives" / "partial").mkdir(parents=True)
        (tmp / "parts" / "trixie.sources").write_text(
            f"Types: deb\nURIs: {uris}\nSuites: trixie\nComponents: main\n"
            + (f"Signed-By: {keyring}\n" if keyring else ""))
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # a user id with no name (a container's); apt drops privileges only as root
            user = None
        apt = ["apt-get", "-q", "-o", "Dir::Etc::SourceList=/dev/null", "-o", f"Dir::Etc::SourceParts={tmp}/parts",
               "-o", f"Dir::State::Lists={tmp}/lists", "-o", f"Dir::Cache={tmp}/cache",
               *(["-o", f"APT::Sandbox::User={user}"] if user else [])]
        what = "downloading ONNX Runtime's headers (Debian trixie libonnxruntime-dev)"
        _run([*apt, "update"], what=what)
        _run([*apt, "download", "libonnxruntime-dev"], cwd=tmp, what=what)
        debs = sorted(tmp.glob("libonnxruntime-dev_*.deb"))
        if not debs:
            raise FileNotFoundError("apt-get downloaded no libonnxruntime-dev package")
        dest.parent.mkdir(parents=True, exist_ok=True)
        remove_dead_temporaries(dest)  # the copy a fetch killed outright was unpacking
        staging = temporary_of(dest)  # beside dest: os.replace cannot cross filesystems
        shutil.rmtree(staging, ignore_errors=True)  # (a dead process's of the same number)
        staging.mkdir()
        try:
            _run(["dpkg-deb", "-x", str(debs[-1]), str(staging)], what="unpacking libonnxruntime-dev")
            try:
                os.replace(staging, dest)
            except OSError:  # dest is not empty: another process's whole copy, moved in first, serves
                if not dest.is_dir():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def _debian_archive() -> tuple[str, str]:
    """This machine's Debian archive URI and keyring, from its own apt sources."""
    for path in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        text = path.read_text(errors="replace")
        for stanza in text.split("\n\n"):
            fields = dict(re.findall(r"^([\w-]+):\s*(.+)$", stanza, re.M))
            if "main" in fields.get("Components", "").split() and "-security" not in fields.get("Suites", "") \
                    and fields.get("URIs", "").split()[:1] and "debian" in fields.get("URIs", ""):
                return fields["URIs"].split()[0], fields.get("Signed-By", "")
    lists = Path("/etc/apt/sources.list")
    if lists.is_file():
        for line in lists.read_text(errors="replace").splitlines():
            parts = line.split()
            if parts[:1] == ["deb"] and len(parts) >= 3 and "debian" in parts[1] and "security" not in parts[2]:
                return parts[1], ""
    raise FileNotFoundError("found no Debian archive in this machine's apt sources to fetch ONNX Runtime's "
                            "headers from; set ORT_INCLUDE_DIR to a folder holding onnxruntime_cxx_api.h")


def _cpu_signature() -> str:
    """The CPU's architecture and features, which a `-march=native` build is made for."""
    if sys.platform == "darwin":  # no /proc/cpuinfo there; Apple silicon lacks the feature keys (and builds
        try:                      # without -march=native): what sysctl prints serves
            flags = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string", "machdep.cpu.features",
                                    "machdep.cpu.leaf7_features"], capture_output=True, text=True).stdout
        except OSError:
            flags = ""
    else:
        try:
            flags = next(line for line in CPUINFO.read_text().splitlines() if line.startswith(("flags", "Features")))
        except (OSError, StopIteration):
            flags = ""
    return platform.machine() + flags


def _run(cmd: list[str], cwd: Path | None = None, what: str | None = None) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except OSError as e:
        raise FileNotFoundError(f"{what or cmd[0]}: cannot run {cmd[0]} ({e})") from None
    if done.returncode != 0:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise ValueError(f"{what or cmd[0]} failed (exit {done.returncode}):\n{tail}")
    return done.stdout


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m export.ortops", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--isa", default="native", choices=list(ISAS),
                   help="the kernel: native (the best this CPU runs: avx512-vnni, avx2 or portable), or force one")
    p.add_argument("--force", action="store_true", help="rebuild even when a cached build exists")
    args = p.parse_args(argv)
    path = library_path(args.isa, force=args.force)
    print(f"{path} ({kernel_isa(path)} kernels)")


if __name__ == "__main__":
    from quant.cli import run
    raise SystemExit(run(main))
