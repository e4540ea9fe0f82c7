"""Load a compiled artifact and run it, like an onnxruntime InferenceSession.

Only the TVM runtime is used (``TVM_USE_RUNTIME_LIB=1`` is set before TVM is imported, so the compiler
library never enters the process).  Before ``module.so`` is loaded — loading a shared library runs
code — the manifest's version, target and every file hash are checked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decoding import DecoderMethods
from .errors import ArtifactError, QCompileError
from .manifest import MODULE, PARAMS, read_manifest, sha256_file, verify_files

__all__ = ["load", "Session", "NodeArg"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeArg:
    """An input or output of the model: name, numpy dtype name, shape (ints, or str for symbolic)."""

    name: str
    dtype: str
    shape: tuple


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _import_tvm_runtime():
    """Import TVM with its runtime library only (unless the process already imported TVM).

    TVM's thread pool reads ``TVM_NUM_THREADS`` when it starts (at the first parallel kernel) and
    otherwise uses half the hardware threads; unless the user set it, use every CPU we may run on.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(_usable_cpus()))
    before = os.environ.get("TVM_USE_RUNTIME_LIB")
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    try:
        import tvm  # noqa: PLC0415
        from tvm.runtime import vm  # noqa: PLC0415
    finally:  # don't leak the setting into child processes (a compiler run needs the full library)
        if before is None:
            del os.environ["TVM_USE_RUNTIME_LIB"]
        else:
            os.environ["TVM_USE_RUNTIME_LIB"] = before
    return tvm, vm


def _host_cpu_flags() -> set[str]:
    # x86 lists its ISA extensions as "flags", aarch64 as "Features" (asimd, asimddp, i8mm, sve...)
    key = "Features" if platform.machine().lower() in ("aarch64", "arm64") else "flags"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _check_target(root: Path, target: dict) -> None:
    device = target.get("device")
    if device == "cuda":
        return  # the GPU's architecture is checked once TVM's CUDA runtime is up (_check_cuda_arch)
    if device != "cpu":
        raise ArtifactError(f"{root}: compiled for device {device!r}; this runtime runs 'cpu' and 'cuda' artifacts")
    arch = target.get("arch")
    host = platform.machine().lower()
    if arch and arch != host:
        raise ArtifactError(f"{root}: compiled for {arch}, this machine is {host}; recompile for this target")
    needed = set(target.get("cpu_flags", []))
    have = _host_cpu_flags()
    if needed and have and not needed <= have:
        raise ArtifactError(
            f"{root}: compiled for a CPU with {sorted(needed - have)}, which this CPU lacks; "
            f"recompile with --target {'arm' if host in ('aarch64', 'arm64') else 'x86'} for this CPU"
        )


def _cudart_dirs() -> list[Path]:
    """Folders that may hold ``libcudart.so.13`` besides the loader's path: CUDA_HOME, /usr/local/cuda and
    the ``nvidia-cuda-runtime`` wheel (PyTorch's)."""
    dirs = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / sub for sub in ("lib64", "lib")]
    try:
        import nvidia  # noqa: PLC0415  (namespace package of NVIDIA's wheels)

        for base in getattr(nvidia, "__path__", []):
            dirs += [Path(base) / "cu13" / "lib", Path(base) / "cuda_runtime" / "lib"]
    except ImportError:
        pass
    return [d for d in dirs if d.is_dir()]


def _load_cuda_runtime(tvm) -> None:
    """Load TVM's CUDA runtime library (``libtvm_runtime_cuda.so``, beside ``libtvm_runtime.so``).

    With ``TVM_USE_RUNTIME_LIB=1`` TVM loads no device backend itself.  The library needs the CUDA
    runtime (``libcudart.so.13``) and the driver (``libcuda.so.1``); a cudart that the loader does not
    find on its own is preloaded from :func:`_cudart_dirs`.
    """
    import ctypes  # noqa: PLC0415

    from tvm.base import _LOADED_LIBS  # noqa: PLC0415
    from tvm_ffi.libinfo import load_lib_ctypes  # noqa: PLC0415

    if "tvm_runtime_cuda" in _LOADED_LIBS:
        return
    lib_dir = Path(_LOADED_LIBS["tvm_runtime"]._name).resolve().parent  # noqa: SLF001

    def load():
        _LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(package="tvm", target_name="tvm_runtime_cuda",
                                                           extra_lib_paths=[lib_dir], mode="RTLD_LOCAL")

    try:
        load()
        return
    except (OSError, RuntimeError) as first:
        error = first
    for d in _cudart_dirs():
        for lib in sorted(d.glob("libcudart.so.1[0-9]*")):
            try:
                ctypes.CDLL(str(lib), mode=ctypes.RTLD_GLOBAL)
                load()
                log.info("CUDA runtime from %s", lib)
                return
            except (OSError, RuntimeError) as e:
                error = e
    raise ArtifactError(f"cannot load TVM's CUDA runtime (libtvm_runtime_cuda.so in {lib_dir}): {error}; "
                        f"it needs the NVIDIA driver and libcudart.so.13") from error


def _check_cuda_arch(root: Path, tvm, target: dict) -> None:
    """The artifact holds SASS for ``sm_XX`` and PTX of that arch: it runs on that arch or a newer one."""
    dev = tvm.cuda(0)
    if not dev.exist:
        raise ArtifactError(f"{root}: compiled for CUDA, but this machine has no CUDA GPU")
    arch = str(target.get("arch", ""))
    have = dev.compute_version  # "9.0"
    if arch.startswith("sm_") and arch[3:].isdigit():
        need = int(arch[3:])
        got = int(have.replace(".", ""))
        if got < need:
            raise ArtifactError(f"{root}: compiled for {arch}, this GPU is sm_{got}; "
                                f"recompile with --target cuda:sm_{got}")


class Session(DecoderMethods):
    """A loaded artifact.  ``run(output_names, feeds)`` returns a list of numpy arrays.

    ``params``: arrays (name -> numpy) to use instead of ``params.safetensors``, which then need not be
    there (benchmarks with generated weights: the code, ``module.so``, is still checked against its hash);
    they must have the names, shapes and dtypes of the artifact's parameters (:func:`param_specs`).
    """

    def __init__(self, path: str | Path, params: dict | None = None):
        root = Path(path)
        self.path = root
        self.manifest = read_manifest(root)
        _check_target(root, self.manifest["target"])
        verify_files(root, self.manifest, skip=(PARAMS,) if params is not None else ())
        for required in (MODULE, PARAMS):
            if required not in self.manifest["files"]:
                raise ArtifactError(f"{root}: manifest lists no {required}")
        tvm, vm = _import_tvm_runtime()
        self._tvm = tvm
        if self.manifest["target"].get("device") == "cuda":
            _load_cuda_runtime(tvm)
            _check_cuda_arch(root, tvm, self.manifest["target"])
            self._dev = tvm.cuda(0)
        else:
            self._dev = tvm.cpu(0)
        lib = self._load_library(tvm, root / MODULE, self.manifest["files"][MODULE])
        self._vm = vm.VirtualMachine(lib, self._dev)
        self._main = self._vm["main"]
        self._step, self._step_dims = self._decode_step()
        self._params = self._load_params(root / PARAMS, params)
        # the params as main's trailing arguments: one tuple (manifest "params_as_tuple") or one by one
        if self.manifest.get("params_as_tuple"):
            import tvm_ffi  # noqa: PLC0415  (TVM's own FFI package: an Array of tensors is one argument)

            self._param_args = [tvm_ffi.convert(self._params)]
        else:
            self._param_args = self._params
        self._generator = None
        self.inputs = [NodeArg(i["name"], i["dtype"], tuple(i["shape"])) for i in self.manifest["inputs"]]
        self.outputs = [NodeArg(o["name"], o["dtype"], tuple(o["shape"])) for o in self.manifest["outputs"]]
        log.info("loaded %s: %d inputs, %d outputs, %d params", root, len(self.inputs),
                 len(self.outputs), len(self._params))

    @staticmethod
    def _load_library(tvm, path: Path, digest: str):
        """Load ``module.so`` from a private copy named by its hash.

        The dynamic loader caches libraries by path: a recompiled artifact at the same path would run
        the old code in a process that loaded it before.  The copy is re-hashed after it is written, so
        what is loaded is exactly what was checked.
        """
        data = path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ArtifactError(f"{path}: changed while it was being loaded; recompile or copy it again")
        with tempfile.TemporaryDirectory(prefix="qcompile-") as tmp:
            private = Path(tmp) / f"module-{digest[:16]}.so"
            private.write_bytes(data)
            if sha256_file(private) != digest:
                raise ArtifactError(f"{path}: the private copy does not match its hash")
            return tvm.runtime.load_module(str(private))

    def _load_params(self, path: Path, given: dict | None = None) -> list:
        from safetensors.numpy import load_file  # noqa: PLC0415

        arrays = load_file(str(path)) if given is None else given
        names = self.manifest["params"]
        missing = [n for n in names if n not in arrays]
        if missing:
            raise ArtifactError(f"{self.path}: {PARAMS if given is None else 'the given params'} lack "
                                f"parameters {missing[:5]}")
        # tvm.runtime.tensor copies into a 64-byte aligned buffer owned by TVM (on the session's device)
        return [self._tvm.runtime.tensor(np.ascontiguousarray(arrays[n]), self._dev) for n in names]

    def get_inputs(self) -> list[NodeArg]:
        return list(self.inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self.outputs)

    def _prepare(self, feeds: dict) -> list:
        names = [i.name for i in self.inputs]
        unknown = sorted(set(feeds) - set(names))
        missing = [n for n in names if n not in feeds]
        if unknown or missing:
            raise QCompileError(
                f"{self.path}: inputs do not match the model: expected {names}, "
                f"missing {missing}, unknown {unknown}"
            )
        args = []
        for spec in self.inputs:
            a = np.asarray(feeds[spec.name])
            if a.dtype != np.dtype(spec.dtype):
                raise QCompileError(
                    f"{self.path}: input {spec.name!r} expects dtype {spec.dtype}, found {a.dtype}"
                )
            if a.ndim != len(spec.shape) or any(
                isinstance(d, int) and d != s for d, s in zip(spec.shape, a.shape)
            ):
                raise QCompileError(
                    f"{self.path}: input {spec.name!r} expects shape {list(spec.shape)}, found {list(a.shape)}"
                )
            args.append(self.device_tensor(a))
        return args

    def device_tensor(self, a: np.ndarray):
        """A TVM tensor on the session's device holding ``a`` (for :meth:`run_device`)."""
        return self._tvm.runtime.tensor(np.ascontiguousarray(a), self._dev)

    def _decode_step(self):
        """(the module's decode-step function, [(input, axis, size)] its inputs must have), or (None, []):
        manifest ``decode_step`` (:mod:`qcompile.targets.decode_step`)."""
        spec = self.manifest.get("decode_step")
        if not spec:
            return None, []
        dims = spec["dims"]
        checks = [(i, a, dims[d]) for i, inp in enumerate(self.manifest["inputs"])
                  for a, d in enumerate(inp["shape"]) if isinstance(d, str) and d in dims]
        try:
            return self._vm[spec["function"]], checks
        except Exception as e:  # noqa: BLE001
            raise ArtifactError(f"{self.path}: the manifest names a decode step {spec['function']!r} that "
                                f"{MODULE} lacks ({e})") from None

    def run_device(self, args: list) -> list:
        """Run on device tensors in input order; the outputs stay device tensors (no copy to numpy).
        Inputs with the dims of the decode step (manifest ``decode_step``) run its function."""
        if len(args) != len(self.inputs):
            raise QCompileError(f"{self.path}: expected {len(self.inputs)} inputs, got {len(args)}")
        step = self._step is not None and all(args[i].shape[a] == v for i, a, v in self._step_dims)
        result = (self._step if step else self._main)(*args, *self._param_args)
        return [result] if isinstance(result, self._tvm.runtime.Tensor) else list(result)

    def device_function(self, name: str):
        """The module's function ``name`` besides ``main`` (e.g. ``greedy``, the token choice on the
        device of a decoder compiled for a GPU), or None if the module has none."""
        try:
            return self._vm[name]
        except Exception:  # noqa: BLE001  (the module raises its own error type for a missing name)
            return None

    def run(self, output_names: list[str] | None, feeds: dict) -> list[np.ndarray]:
        """Run the model; ``output_names=None`` returns every output in the model's order."""
        self._check_cache_room(feeds)
        by_name = {o.name: v for o, v in zip(self.outputs, self.run_device(self._prepare(feeds)))}
        if output_names is None:
            output_names = [o.name for o in self.outputs]
        unknown = [n for n in output_names if n not in by_name]
        if unknown:
            raise QCompileError(f"{self.path}: no outputs named {unknown}; outputs are {list(by_name)}")
        return [by_name[n].numpy() for n in output_names]


    def _check_cache_room(self, feeds: dict) -> None:
        """An in-place KV cache (manifest ``kv_cache``) must hold the past and the new positions: the
        kernels write position past + s for s < seq into buffers of ``capacity`` positions."""
        kv = self.manifest.get("kv_cache")
        if not kv or "input_ids" not in feeds or kv["past_positions"] not in feeds or not kv["layers"]:
            return
        past = int(np.shape(feeds[kv["past_positions"]])[0])
        seq = int(np.shape(feeds["input_ids"])[-1])
        buffer = kv["layers"][0]["key"]
        capacity = int(np.shape(feeds[buffer])[2]) if buffer in feeds else past + seq
        if past + seq > capacity:
            raise QCompileError(
                f"{self.path}: the KV cache buffers hold {capacity} positions ({buffer!r} dim 2), but "
                f"{kv['past_positions']!r} says {past} are filled and input_ids adds {seq}: "
                f"allocate at least {past + seq} (Generator.reserve does this)")


def load(path: str | Path) -> Session:
    """Load the artifact at ``path`` (a ``.qcm`` directory)."""
    return Session(path)
