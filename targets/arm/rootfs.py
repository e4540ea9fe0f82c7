"""An arm64 Python for running ARM artifacts here under ``qemu-aarch64-static`` (tests, CI).

A Debian arm64 root filesystem, made by ``debootstrap --foreign`` (the first stage only: it downloads
and unpacks; the packages' scripts never run, so no binfmt_misc or chroot is needed) with ``python3``,
plus the aarch64 wheels of the TVM runtime (``apache-tvm`` without its 240 MB compiler library),
``apache-tvm-ffi``, numpy and safetensors.  It is cached under ``~/.cache/qcompile/arm64-rootfs/<key>``
(``QCOMPILE_ARM_ROOTFS`` overrides the folder), the key a hash of every version below, and built into a
temporary folder that is renamed into place when it works, so an interrupted build is never used.

The emulated Python runs as ``qemu-aarch64-static -L <rootfs> <rootfs>/usr/bin/python3``: ``-L`` makes
the rootfs the prefix of the guest's file lookups (the loader, libraries, the standard library) while
paths absent from it (the tests' temporary folders) are the host's.

Run ``python -m qcompile.targets.arm.rootfs`` to make it (prints its path); ``.ci/run`` does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from qcompile.runtime.errors import QCompileError

__all__ = ["ensure_rootfs", "find_rootfs", "python_command", "stage_runtime", "run_python", "QEMU", "TOOLS"]

log = logging.getLogger(__name__)

QEMU = "qemu-aarch64-static"
TOOLS = {QEMU: "qemu-user-static", "debootstrap": "debootstrap", "dpkg-deb": "dpkg"}
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
PYTHON = "3.11"  # bookworm's python3
WHEELS = ("apache-tvm==0.27.0.post1", "apache-tvm-ffi==0.1.14.post1", "numpy==2.4.6", "safetensors==0.8.0",
          "ml_dtypes==0.6.0", "typing_extensions==4.15.0")
PLATFORMS = ("manylinux2014_aarch64", "manylinux_2_28_aarch64")
# files of the wheels that a runtime-only TVM never opens
PRUNE = ("tvm/lib/libtvm_compiler.so", "tvm/lib/libtvm_runtime_cuda.so", "tvm/include", "tvm_ffi/include")
LAYOUT = 1  # bump when the steps below change what the rootfs holds
SITE = "usr/lib/python3/dist-packages"


def _key() -> str:
    what = {"suite": SUITE, "python": PYTHON, "wheels": WHEELS, "prune": PRUNE, "layout": LAYOUT}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:12]


def cache_dir() -> Path:
    base = os.environ.get("QCOMPILE_ARM_ROOTFS")
    return Path(base) if base else Path.home() / ".cache" / "qcompile" / "arm64-rootfs"


def find_rootfs() -> Path | None:
    """The cached rootfs of the current key, or None if it has not been made."""
    root = cache_dir() / _key()
    return root if (root / ".complete").exists() else None


def missing_tools() -> list[str]:
    """Debian packages to install before a rootfs can be made and run."""
    return sorted({pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None})


def python_command(rootfs: Path) -> list[str]:
    return [QEMU, "-L", str(rootfs), str(rootfs / "usr/bin/python3")]


def _run(cmd: list[str], what: str, retries: int = 1, **kw) -> None:
    """Run ``cmd``; once more on failure (downloads fail now and then), then raise with its output."""
    for attempt in range(retries + 1):
        proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
        if proc.returncode == 0:
            return
        log.warning("%s failed (attempt %d): %s", what, attempt + 1, proc.stderr[-2000:] or proc.stdout[-2000:])
    raise QCompileError(f"{what} failed: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _debootstrap(dest: Path) -> None:
    """First stage of debootstrap with python3, then unpack the packages it only downloaded."""
    if dest.exists():
        shutil.rmtree(dest)

    def stage():
        if dest.exists():
            shutil.rmtree(dest)
        _run(["debootstrap", "--foreign", "--arch", "arm64", "--variant=minbase", "--include=python3",
              SUITE, str(dest), MIRROR], "debootstrap (arm64)", retries=0)

    try:
        stage()
    except QCompileError as e:
        log.warning("debootstrap failed, retrying once: %s", str(e)[-500:])
        stage()
    # --foreign unpacks the required packages only; python3 and its libraries are left downloaded.
    # --keep-directory-symlink: /lib is a link to usr/lib (merged /usr) and must stay one.
    for deb in sorted((dest / "var/cache/apt/archives").glob("*.deb")):
        tar = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(dest)], stdin=tar.stdout, check=True)
        if tar.wait() != 0:
            raise QCompileError(f"dpkg-deb could not read {deb}")
        deb.unlink()  # 100 MB the rootfs does not need once unpacked


def _wheels(dest: Path, site: Path) -> None:
    """The aarch64 wheels (pip download for another platform), unpacked into the rootfs's site folder."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check", "--no-deps",
           "--only-binary", ":all:", "--python-version", PYTHON, "--implementation", "cp",
           "--abi", "cp" + PYTHON.replace(".", ""), "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    _run(cmd + list(WHEELS), "pip download (aarch64 wheels)")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != len(WHEELS):
        raise QCompileError(f"pip download gave {len(wheels)} wheels for {len(WHEELS)} requirements: {wheels}")
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    for rel in PRUNE:
        p = site / rel
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def ensure_rootfs() -> Path:
    """The cached rootfs, made first if needed (a few minutes: ~150 MB of downloads)."""
    found = find_rootfs()
    if found is not None:
        return found
    missing = missing_tools()
    if missing:
        raise QCompileError(f"an arm64 rootfs needs {missing}: apt-get install {' '.join(missing)}")
    final = cache_dir() / _key()
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{final.name}-", dir=final.parent) as tmp:
        root = Path(tmp) / "root"
        log.info("making an arm64 rootfs in %s (debootstrap %s + aarch64 wheels)", final, SUITE)
        _debootstrap(root)
        site = root / SITE
        site.mkdir(parents=True, exist_ok=True)
        _wheels(Path(tmp) / "wheels", site)
        # bytecode now: Debian compiles it in the packages' scripts, which never ran (halves import time)
        py = python_command(root)
        for folder in (root / "usr/lib" / f"python{PYTHON}", site):
            subprocess.run([*py, "-m", "compileall", "-q", "-x", r"/test/|lib2to3|idlelib|tkinter", str(folder)],
                           capture_output=True, check=False)
        proc = subprocess.run([*py, "-c", "import tvm, numpy, safetensors.numpy; from tvm.runtime import vm; "
                               "print(tvm.__version__)"], capture_output=True, text=True,
                              env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"})
        if proc.returncode != 0:
            raise QCompileError(f"the arm64 rootfs's python cannot import the TVM runtime:\n{proc.stderr[-3000:]}")
        (root / ".complete").write_text(json.dumps({"key": _key(), "tvm": proc.stdout.strip()}))
        if final.exists():  # made by a concurrent run meanwhile
            return final
        root.rename(final)
    log.info("arm64 rootfs ready: %s", final)
    return final


def stage_runtime(dest: Path) -> Path:
    """Copy this checkout's ``runtime/`` to ``dest/qcompile/runtime`` (it imports nothing else of qcompile);
    returns the folder to put on the emulated Python's ``PYTHONPATH``."""
    import qcompile.runtime  # noqa: PLC0415

    src = Path(qcompile.runtime.__file__).parent
    shutil.copytree(src, dest / "qcompile" / "runtime", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    return dest


def run_python(rootfs: Path, args: list[str], pythonpath: Path | None = None, timeout: float = 600,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the rootfs's Python under qemu with ``args``; raises with its output when it fails."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TVM_"))}
    full_env.update(env or {})
    if pythonpath is not None:
        full_env["PYTHONPATH"] = str(pythonpath)
    proc = subprocess.run([*python_command(rootfs), *args], capture_output=True, text=True, timeout=timeout,
                          env=full_env)
    if proc.returncode != 0:
        raise QCompileError(f"arm64 python {args} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                            f"{proc.stderr[-5000:]}")
    return proc


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_rootfs())
