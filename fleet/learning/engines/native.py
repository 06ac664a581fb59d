"""The fused engine's native kernels (kernels.c): built with the machine's C compiler on first
use, cached, and loaded with ctypes.

Why a C file and not a PyTorch extension or torch.compile: the kernels are a few hundred lines of
plain loops over raw arrays, so they need no PyTorch headers, no ninja and no Python ABI; gcc
builds them in half a second, which each Ray worker can afford on first use. A machine without
a C compiler runs the same bf16 mode with PyTorch's own ops (slower, same precision contract).

Flags: `-O3 -march=native -ffast-math` to compile (the loops vectorise only with reassociated
sums and no NaN or infinity; the source never relies on either), and a separate link step
without it. Linking a shared object with `-ffast-math` (GCC before 13) adds crtfastmath.o,
which sets flush-to-zero for the whole process when the library loads and would change every
fp32 result computed after it, including the reproducible fp32 engine's; a test holds that.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("kernels.c")
ABI = 1  # fleet_kernels_abi() of the source this module binds
COMPILE = ("-O3", "-std=c99", "-fPIC", "-ffast-math")
LINK = ("-shared",)

_P, _I, _F, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64
_SIGNATURES = {
    "cell_forward": ([_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P], None),
    "cell_backward": ([_I, _I, _I, _P, _P, _P, _P, _P, _P, _P, _P], None),
    "softmax_xent_cols": ([_I, _I, _P, _P, _L], ctypes.c_double),
    "update": ([_L, _P, _P, _F, _P], None),
    "scatter_add_rows": ([_I, _P, _I, _F, _P, _P, _P], None),
    "fleet_kernels_abi": ([], ctypes.c_int),
}

_loaded: dict[str, ctypes.CDLL | str] = {}  # per process: the library, or why there is none


def compiler() -> str | None:
    """The C compiler to build with: $CC, else cc, gcc or clang on the PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def cache_dir() -> Path:
    """Where built libraries are kept: $FLEET_CACHE_DIR, else $XDG_CACHE_HOME/fleet or ~/.cache/fleet
    (below it, `kernels/`). Where that cannot be written, a private folder in the temp dir."""
    root = os.environ.get("FLEET_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME")
    base = Path(root) if root else Path.home() / ".cache"
    return (base if os.environ.get("FLEET_CACHE_DIR") else base / "fleet") / "kernels"


def _cpu_signature() -> str:
    """What `-march=native` compiles for: the CPU's model and feature flags (or the platform)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
        return "\n".join(dict.fromkeys(lines))
    except OSError:
        return platform.processor() or platform.machine()


def _own(path: Path) -> None:
    """Refuse a path that is a link, another user's, or writable by anyone else."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise RuntimeError(f"{path} is not this user's alone (a link, another owner, or writable by others)")


def _build(cc: str, rebuild: bool = False) -> Path:
    """The built library for this source, compiler and CPU: from the cache, or compiled into it.

    The file name is a hash of everything that changes the machine code, so a new source, a new
    compiler or another CPU (a node of a cluster sharing a home directory) gets its own build.
    Each process compiles into a private temporary name and renames it into place, so several
    Ray workers building at once never load a half-written file."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), cc, version, " ".join(COMPILE + LINK), _cpu_signature()]).encode()
    ).hexdigest()[:20]
    target = cache_dir() / f"kernels-{key}.so"
    try:
        target.parent.parent.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(mode=0o700, exist_ok=True)
        if not os.access(target.parent, os.W_OK):
            raise PermissionError(target.parent)
    except OSError:  # a read-only home (some cluster images): this user's own temporary folder
        target = Path(tempfile.gettempdir()) / f"fleet-kernels-{os.getuid()}" / target.name
        target.parent.mkdir(mode=0o700, exist_ok=True)
    # Code is loaded from here, so the folder and the file must be this user's alone: in a
    # shared temp dir another user could otherwise plant a library under the predictable name.
    _own(target.parent)
    if target.exists() and not rebuild:
        _own(target)
        return target
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".build-", suffix=".so")
    os.close(fd)
    obj = tmp[:-3] + ".o"
    try:
        errors = ""
        for arch in (["-march=native"], []):  # a compiler that lacks -march=native builds generic
            steps = ([cc, *COMPILE, *arch, "-c", str(SOURCE), "-o", obj], [cc, *LINK, obj, "-o", tmp, "-lm"])
            for step in steps:
                out = subprocess.run(step, capture_output=True, text=True)
                if out.returncode:
                    errors = out.stderr.strip()
                    break
            else:
                os.chmod(tmp, 0o700)  # the linker's mode follows the umask; this is code we load
                os.replace(tmp, target)
                return target
        raise RuntimeError(f"{cc} failed: {errors[-500:]}")
    finally:
        for path in (tmp, obj):
            if os.path.exists(path):
                os.unlink(path)


def load() -> ctypes.CDLL | None:
    """The kernels library for this process, built on first use; None (with the reason logged
    once per process, see `why_not`) where there is no C compiler or the build fails."""
    if "lib" in _loaded:
        lib = _loaded["lib"]
        return lib if isinstance(lib, ctypes.CDLL) else None
    cc = compiler()
    try:
        if sys.byteorder != "little":
            raise RuntimeError("the kernels read bf16 as the high half of a little-endian fp32")
        if cc is None:
            raise RuntimeError("no C compiler found (set $CC, or install gcc or clang)")
        try:
            lib = _bind(ctypes.CDLL(str(_build(cc))))
        except (OSError, AttributeError):  # a cached file that does not load: build it again, once
            lib = _bind(ctypes.CDLL(str(_build(cc, rebuild=True))))
    except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as exc:
        _loaded["lib"] = str(exc)
        log.warning("native kernels unavailable, bf16 runs on PyTorch ops: %s", exc)
        return None
    _loaded["lib"] = lib
    return lib


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare every kernel's signature (ctypes checks the arguments of each call against it)."""
    for name, (args, res) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    if lib.fleet_kernels_abi() != ABI:
        raise RuntimeError(f"kernels ABI {lib.fleet_kernels_abi()} != {ABI}")
    return lib


def why_not() -> str | None:
    """Why `load()` returned None in this process (None if it loaded, or was never asked)."""
    lib = _loaded.get("lib")
    return lib if isinstance(lib, str) else None
