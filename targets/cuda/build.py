"""Build a lowered Relax module for CUDA ahead of time and export ``module.so``.

The device code is compiled on the build machine by ``nvcc`` into a fatbin (SASS for the target's
``sm_XX``, plus PTX of the same arch so a newer GPU can JIT it) that ``export_library`` embeds in
``module.so``: loading needs the CUDA driver and TVM's runtime (``libtvm_runtime_cuda.so``), no compiler.

TVM's CUDA codegen only calls the compiler when TVM's CUDA runtime library is loaded, and that
library links ``libcuda.so.1`` (the driver).  A build machine without an NVIDIA driver gets a stub
``libcuda.so.1`` (every entry returns CUDA_ERROR_NO_DEVICE; nothing is ever launched at build time),
compiled once with the host C compiler into the user's cache directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

__all__ = ["build_library", "relax_pipeline", "compile_cuda_source", "nvcc_path", "BuiltSources"]

log = logging.getLogger(__name__)

# the driver entry points libtvm_runtime_cuda.so imports (nm -D --undefined-only, TVM 0.27.0.post1)
_DRIVER_SYMBOLS = ("cuDeviceGetName", "cuFuncSetAttribute", "cuGetErrorName", "cuGetErrorString",
                   "cuLaunchKernelEx", "cuModuleGetFunction", "cuModuleLoadData", "cuModuleUnload",
                   "cuTensorMapEncodeTiled")


def nvcc_path() -> str | None:
    """``nvcc`` from $CUDA_HOME, /usr/local/cuda or the PATH (None if there is none)."""
    for cand in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        p = Path(cand) / "bin" / "nvcc"
        if cand and p.is_file():
            return str(p)
    return shutil.which("nvcc")


def _stub_driver() -> Path:
    """Path of a stub ``libcuda.so.1`` (built on first use)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "qcompile" / "cuda-stub"
    lib = cache / "libcuda.so.1"
    if lib.is_file():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    src = "".join(f"int {s}(void) {{ return 100; }}\n" for s in _DRIVER_SYMBOLS)  # CUDA_ERROR_NO_DEVICE
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("building for CUDA on a machine without an NVIDIA driver needs a C compiler (cc)")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "stub.c").write_text(src)
        out = Path(tmp) / "libcuda.so.1"
        subprocess.run([cc, "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", str(out), str(Path(tmp) / "stub.c")],
                       check=True, capture_output=True)
        os.replace(out, lib)
    log.info("no NVIDIA driver here: built a stub %s for TVM's CUDA codegen", lib)
    return lib


def ensure_cuda_codegen() -> None:
    """Load TVM's CUDA runtime library (with a stub driver if needed) so that codegen compiles kernels."""
    from tvm.base import _LOADED_LIBS  # noqa: PLC0415
    from tvm_ffi.libinfo import load_lib_ctypes  # noqa: PLC0415

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    try:
        ctypes.CDLL("libcuda.so.1", mode=ctypes.RTLD_GLOBAL)
    except OSError:
        ctypes.CDLL(str(_stub_driver()), mode=ctypes.RTLD_GLOBAL)
    runtime_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent  # noqa: SLF001
    _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                       extra_lib_paths=[runtime_dir], mode="RTLD_LOCAL")


def _arch(tvm_target: dict) -> str:
    arch = str(tvm_target.get("arch", "sm_90"))
    if not arch.startswith("sm_"):
        raise ValueError(f"CUDA target arch {arch!r}: expected sm_XX")
    return arch[3:]


def compile_cuda_source(code: str, arch: str, options: tuple[str, ...] = ()) -> bytes:
    """``code`` -> a fatbin with SASS for ``sm_{arch}`` and PTX for ``compute_{arch}`` (nvcc -O3)."""
    nvcc = nvcc_path()
    if nvcc is None:
        raise RuntimeError("building for CUDA needs nvcc (set CUDA_HOME or put nvcc on the PATH)")
    with tempfile.TemporaryDirectory(prefix="qcompile-cuda-") as tmp:
        src, out = Path(tmp) / "kernels.cu", Path(tmp) / "kernels.fatbin"
        src.write_text(code)
        cmd = [nvcc, "--fatbin", "-O3", "-gencode", f"arch=compute_{arch},code=[sm_{arch},compute_{arch}]",
               *options, "-o", str(out), str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
        return out.read_bytes()


class BuiltSources:
    """The CUDA C++ of each device module compiled by the last :func:`build_library` (for tests, reports)."""

    def __init__(self):
        self.sources: list[str] = []
        self.cuda_graphs: dict[str, int] = {}  # Relax function -> regions replayed as CUDA graphs


@contextlib.contextmanager
def _nvcc_callback(arch: str, sink: BuiltSources):
    """Route TVM's ``tvm_callback_cuda_compile`` to :func:`compile_cuda_source` for the build's duration."""
    import tvm_ffi  # noqa: PLC0415

    previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

    def compile_(code):
        sink.sources.append(code)
        return bytearray(compile_cuda_source(code, arch))

    tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_, override=True)
    try:
        yield
    finally:
        if previous is not None:
            tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)


def relax_pipeline(target, sink: BuiltSources | None = None):
    """TVM's CUDA pipeline (dlight schedules for everything not already scheduled: our kernels are);
    ``sink.cuda_graphs`` gets the number of regions captured as CUDA graphs per function."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.backend.cuda import pipeline as cuda  # noqa: PLC0415

    from ..x86.build import scalar_producers_opaque  # noqa: PLC0415  (target-independent FuseTIR guard)

    legalize = cuda.legalize_passes(target)
    at = next(i for i, p in enumerate(legalize) if p.info.name == "AnnotateTIROpPattern") + 1
    legalize = [*legalize[:at], scalar_producers_opaque(), *legalize[at:]]

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                [relax.transform.DecomposeOpsForInference()]
                + cuda.library_dispatch_passes(target)
                + legalize
                + cuda.dataflow_lower_passes(target)
                + cuda.finalize_passes(target)
            )
            mod = seq(mod)
        if sink is not None:
            sink.cuda_graphs = {gv.name_hint: str(f).count("vm.builtin.cuda_graph.run_or_capture")
                                for gv, f in mod.functions.items() if isinstance(f, relax.Function)}
        return mod

    return _pipeline


def build_library(mod, tvm_target: dict, out_path: str, sink: BuiltSources | None = None) -> None:
    """Compile the Relax module ``mod`` for ``tvm_target`` (``{"kind": "cuda", "arch": "sm_XX"}``) into
    ``out_path``; the CUDA C++ that was compiled goes to ``sink``."""
    import tvm  # noqa: PLC0415

    ensure_cuda_codegen()
    target = tvm.target.Target(tvm_target)
    sink = sink if sink is not None else BuiltSources()
    from ..decode_step import DECODE_STEP  # noqa: PLC0415

    # a decode step's static parts become CUDA graphs (RewriteCUDAGraph, in TVM's finalize passes)
    graphs = any(gv.name_hint == DECODE_STEP for gv in mod.get_global_vars())
    with _nvcc_callback(_arch(tvm_target), sink), target, \
            tvm.transform.PassContext(config={"relax.backend.use_cuda_graph": graphs}):
        ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target, sink))
    ex.export_library(out_path)
    log.info("built %s for %s (%d CUDA module(s), %d kernels)", out_path, tvm_target, len(sink.sources),
             sum(s.count("extern \"C\" __global__") for s in sink.sources) // 2)
