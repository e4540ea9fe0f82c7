"""Run a Vulkan artifact (``kernels.wgsl`` + ``plan.json``) with wgpu (wgpu-native) on its Vulkan backend.

The plan (written by ``qcompile.targets.vulkan.build``) lists the buffers, the WGSL kernels and their
calls in order, with sizes, uniform values and grids as expressions of the model's symbolic dims; it
may hold several variants (a decode step with batch = sequence = 1, then the general plan): a run
uses the first whose condition on the dims holds.
At load, the shader modules, pipelines and parameter buffers are created once.  Device buffers for
inputs, intermediates and the read-back of outputs come from a pool that grows by doubling and is shared
by every set of input shapes (bound to the symbolic dims), and bind groups are cached by the buffers and
offsets they bind, so a new set of shapes (a decode step at a new cache length) mostly costs evaluating
the plan's expressions: new buffers and bind groups only when a buffer grows.  A run writes the inputs
and the shape set's uniform values, records one command buffer (every dispatch in one compute pass, then
the outputs copied into one read-back buffer), submits it and maps that buffer once.

``run_device`` keeps tensors on the device (a decoder's KV cache between steps, :mod:`.generate`): it
takes :class:`DeviceTensor` inputs (copied on the device into the run's input buffers at the start of its
command buffer) and returns :class:`DeviceTensor` views of the run's output buffers without waiting or
reading back; a view stays valid until the session's next run (a later use raises), ``.numpy()`` reads
it back.

int64 tensors live on the device as int32 (WGSL has no 64-bit integers): inputs are narrowed on upload
(values must fit) and outputs widened on download.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import struct
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decoding import DecoderMethods
from .errors import ArtifactError, QCompileError
from .manifest import KERNELS_WGSL, PARAMS, PLAN, read_manifest, required_files, verify_files

__all__ = ["Session", "DeviceTensor", "load", "compile_expr", "request_device"]

log = logging.getLogger(__name__)

PLAN_FORMAT = 2
_KERNEL_MARK = "// qcompile-kernel: "
_SHAPE_SETS = 16  # shape signatures whose uniform values and dispatch lists are kept
_POD_STRUCT = {"i32": "<i", "u32": "<I", "f32": "<f"}
_READ_ALIGN = 256  # offsets of the outputs in the read-back buffer
_DEVICE_NUMPY = {"float32", "float16", "int32", "uint32"}


@dataclass(frozen=True)
class NodeArg:
    """An input or output of the model: name, numpy dtype name, shape (ints, or str for symbolic)."""

    name: str
    dtype: str
    shape: tuple


# -- plan expressions ----------------------------------------------------------------------------------

_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.FloorDiv: "//", ast.Mod: "%"}


def _expr_source(text: str) -> str:
    """A plan expression (ints, names, + - * // %, min, max) as Python source over ``env``, checked to use
    nothing else (the source is compiled: only these forms reach it)."""
    tree = ast.parse(str(text), mode="eval").body

    def src(node) -> str:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return repr(node.value)
        if isinstance(node, ast.Name):
            return f"env[{node.id!r}]"
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return f"({src(node.left)} {_OPS[type(node.op)]} {src(node.right)})"
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return f"(-{src(node.operand)})"
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max") \
                and len(node.args) == 2 and not node.keywords:
            return f"_{node.func.id}({src(node.args[0])}, {src(node.args[1])})"
        raise ArtifactError(f"plan.json: expression {text!r} uses {ast.dump(node)}, which the runtime does not allow")

    return src(tree)


def compile_exprs(texts):
    """Plan expressions as one function of an environment dict that returns their values as a tuple
    (one Python call for all of them: a program for new dims evaluates thousands)."""
    body = "".join(f"{_expr_source(t)}, " for t in texts)
    code = compile(f"lambda env: ({body})", "<plan expressions>", "eval")
    return eval(code, {"__builtins__": {}, "_min": min, "_max": max})  # noqa: S307  (checked forms only)


def compile_expr(text: str):
    """A plan expression (ints, names, + - * // %, min, max) as a function of an environment dict."""
    f = compile_exprs([text])
    return lambda env: f(env)[0]


def expr_names(text: str) -> frozenset[str]:
    """The symbolic dims a plan expression reads."""
    tree = ast.parse(str(text), mode="eval")
    calls = {id(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    return frozenset(n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and id(n) not in calls)


# -- device ---------------------------------------------------------------------------------------------

def request_device(features: tuple[str, ...] = ()):
    """A wgpu device on the Vulkan backend (``WGPU_ADAPTER_NAME`` picks an adapter by name), with the
    adapter's own buffer-size limits."""
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())  # wgpu-native's loader complains without it
    import wgpu  # noqa: PLC0415

    adapters = [a for a in wgpu.gpu.enumerate_adapters_sync() if a.info.get("backend_type") == "Vulkan"]
    if not adapters:
        raise QCompileError("no Vulkan adapter found (install a Vulkan driver, e.g. Mesa's lavapipe: "
                            "apt-get install mesa-vulkan-drivers)")
    want = os.environ.get("WGPU_ADAPTER_NAME")
    if want:
        adapters = [a for a in adapters if want.lower() in a.info.get("device", "").lower()] or adapters
    # a discrete or integrated GPU before a CPU implementation (lavapipe)
    order = {"DiscreteGPU": 0, "IntegratedGPU": 1, "VirtualGPU": 2, "CPU": 3}
    adapter = min(adapters, key=lambda a: order.get(a.info.get("adapter_type", ""), 4))
    missing = [f for f in features if f not in adapter.features]
    if missing:
        raise QCompileError(f"Vulkan adapter {adapter.info['device']} lacks features {missing}")
    limits = {k: adapter.limits[k] for k in ("max-storage-buffer-binding-size", "max-buffer-size",
                                             "max-storage-buffers-per-shader-stage",
                                             "max-compute-workgroup-storage-size",
                                             "max-compute-invocations-per-workgroup")}
    device = adapter.request_device_sync(required_features=list(features), required_limits=limits)
    log.info("wgpu device: %s (%s)", adapter.info["device"], adapter.info.get("description", ""))
    return device


def _split_sources(text: str) -> dict[str, str]:
    out = {}
    for chunk in text.split(_KERNEL_MARK)[1:]:
        name, _, src = chunk.partition("\n")
        out[name.strip()] = src
    return out


def _device_dtype(plan: dict, dtype: str) -> str:
    return plan.get("device_dtypes", {}).get(dtype, dtype)


class _Variant:
    """One plan variant (``when`` its condition on the symbolic dims) with its pipelines, created at load."""

    def __init__(self, sess: Session, plan: dict, sources: dict[str, str]):
        import wgpu  # noqa: PLC0415

        dev = sess.device
        self.plan, self.when, self.kernels = plan, plan["when"], plan["kernels"]
        self.pipelines, self.layouts = [], {}
        for k in self.kernels:
            src = sources.get(k["id"])
            if src is None:
                raise ArtifactError(f"{sess.path}: {KERNELS_WGSL} has no kernel {k['id']}")
            entries = [{"binding": j, "visibility": wgpu.ShaderStage.COMPUTE,
                        "buffer": {"type": "read-only-storage" if access == "read" else "storage"}}
                       for j, access in enumerate(k["bindings"])]
            if k["pod"]:
                entries.append({"binding": len(entries), "visibility": wgpu.ShaderStage.COMPUTE,
                                "buffer": {"type": "uniform"}})
            layout = dev.create_bind_group_layout(entries=entries)
            module = dev.create_shader_module(code=src, label=k["id"])
            pipeline = dev.create_compute_pipeline(
                layout=dev.create_pipeline_layout(bind_group_layouts=[layout]),
                compute={"module": module, "entry_point": k["name"]}, label=k["id"])
            self.layouts[k["id"]] = layout
            self.pipelines.append(pipeline)
        # each call's grid, uniform values and binding offsets as one function of the dims; the calls that
        # read each dim and bind each buffer (a program for new dims recomputes only the calls that read a
        # changed dim or bind a buffer that changed); likewise the intermediate buffers' sizes
        self.call_fns = []
        self.calls_of_dim: dict[str, list[int]] = {}
        self.calls_of_buffer: dict[int, list[int]] = {}
        for c_i, c in enumerate(plan["calls"]):
            texts = (*c["grid"], *c["pod"], *(o for _, o in c["bindings"]))
            self.call_fns.append(compile_exprs(texts))
            for name in frozenset().union(*(expr_names(e) for e in texts)):
                self.calls_of_dim.setdefault(name, []).append(c_i)
            for b in {b for b, _ in c["bindings"]}:
                self.calls_of_buffer.setdefault(b, []).append(c_i)
        inter = [spec["kind"] not in ("input", "param", "const") for spec in plan["buffers"]]
        self.size_fns = [compile_exprs([spec["bytes"]]) if i else None for spec, i in zip(plan["buffers"], inter)]
        self.size_deps = [expr_names(spec["bytes"]) if i else frozenset() for spec, i in zip(plan["buffers"], inter)]
        self.input_shape_fns = [compile_exprs(spec["shape"]) for spec in plan["inputs"]]
        self.output_fns = [compile_exprs([*spec["shape"], spec["offset"]]) for spec in plan["outputs"]]
        # uniform values of every call at its slot of one buffer, rewritten for the shape set of each run
        self.slot = max(dev.limits["min-uniform-buffer-offset-alignment"], 16)
        self.uniform = dev.create_buffer(size=self.slot * max(1, len(plan["calls"])),
                                         usage=wgpu.BufferUsage.UNIFORM | wgpu.BufferUsage.COPY_DST)


class _Program:
    """What one set of input shapes needs: buffers (from the session's pool), uniform values, dispatches
    with their (cached) bind groups, where each output lies in the read-back buffer.  Made from ``base``
    (the variant's last program) where a call reads no dim that changed and binds the same buffers."""

    def __init__(self, sess: Session, variant: _Variant, env: dict, base: _Program | None = None):
        dev, plan, dtypes = sess.device, variant.plan, sess.plan
        self.variant, self.env = variant, env
        vid = id(variant)
        same = base is not None and base.variant is variant
        changed = {k for k in set(env) | set(base.env) if env.get(k) != base.env.get(k)} if same else set()
        buffers: list = []
        self.sizes: list = []  # bytes asked for each intermediate buffer
        for b, spec in enumerate(plan["buffers"]):
            kind = spec["kind"]
            if kind == "input":
                buffers.append(None)  # filled below, sized from the feed
                self.sizes.append(None)
            elif kind in ("param", "const"):
                buffers.append(sess.fixed[spec["name"]])
                self.sizes.append(None)
            else:
                nbytes = base.sizes[b] if same and not variant.size_deps[b] & changed else variant.size_fns[b](env)[0]
                self.sizes.append(nbytes)
                buffers.append(sess.pool.get((vid, "buffer", b), nbytes))
        self.inputs = []
        for i, spec in enumerate(plan["inputs"]):
            itemsize = np.dtype(_device_dtype(dtypes, spec["dtype"])).itemsize
            nbytes = math.prod(variant.input_shape_fns[i](env)) * itemsize
            self.inputs.append(sess.pool.get(("input", i), nbytes))
        for b, spec in enumerate(plan["buffers"]):
            if spec["kind"] == "input":
                buffers[b] = self.inputs[spec["index"]]
        self.buffers = buffers

        calls = plan["calls"]
        max_dim = dev.limits["max-compute-workgroups-per-dimension"]
        if same:  # from the base: only the calls that read a changed dim or bind a buffer that changed
            pods = bytearray(base.pods)
            self.entries = list(base.entries)
            todo = {c for name in changed for c in variant.calls_of_dim.get(name, ())}
            todo.update(c for b, buf in enumerate(buffers) if buf is not base.buffers[b]
                        for c in variant.calls_of_buffer.get(b, ()))
            todo = sorted(todo)
        else:
            pods = bytearray(variant.slot * max(1, len(calls)))
            self.entries = [None] * len(calls)  # per call: (dispatch, bind group entry), None for an empty grid
            todo = range(len(calls))
        for c_i in todo:
            self.entries[c_i] = self._entry(sess, variant, c_i, env, buffers, pods, max_dim)
        self.dispatches = [e[0] for e in self.entries if e is not None]
        self.bind_groups = [e[1] for e in self.entries if e is not None]
        self.pods = bytes(pods)
        self.outputs = []
        offset = 0
        for spec, values in zip(plan["outputs"], (f(env) for f in variant.output_fns)):
            shape = values[:-1]
            ddtype = _device_dtype(dtypes, spec["dtype"])
            nbytes = math.prod(shape) * np.dtype(ddtype).itemsize
            size = max(4, -(-nbytes // 4) * 4)
            self.outputs.append((buffers[spec["buffer"]], values[-1], size, offset, shape, ddtype, spec["dtype"],
                                 nbytes))
            offset += -(-size // _READ_ALIGN) * _READ_ALIGN
        self.read_bytes = max(offset, _READ_ALIGN)

    @staticmethod
    def _entry(sess: Session, variant: _Variant, c_i: int, env: dict, buffers: list, pods: bytearray, max_dim: int):
        """Call ``c_i``'s (dispatch, bind group entry) for ``env`` (None where its grid is empty), its uniform
        values written into its slot of ``pods``."""
        call = variant.plan["calls"][c_i]
        kernel = variant.kernels[call["kernel"]]
        values = variant.call_fns[c_i](env)  # grid x, y, the uniform values, the binding offsets
        gx, gy = values[0], values[1]
        if gx <= 0 or gy <= 0:
            return None
        if gy > max_dim:
            raise QCompileError(f"{sess.path}: kernel {kernel['name']} needs {gy} workgroups in y (limit {max_dim})")
        gz = -(-gx // max_dim)
        x = -(-gx // gz)
        npod = len(call["pod"])
        types = kernel["pod"]  # the kernel's scalars, then packGridDimX (the last block index)
        pod = [*values[2:2 + npod], gx - 1] if types else []
        if len(types) != len(pod):
            raise ArtifactError(f"{sess.path}: kernel {kernel['name']} takes {len(types)} uniform values, "
                                f"the plan gives {len(pod)}")
        slot = variant.slot
        for j, (t, v) in enumerate(zip(types, pod)):
            struct.pack_into(_POD_STRUCT[t], pods, c_i * slot + 4 * j, v)
        bound = tuple((buffers[b], off) for (b, _), off, _a in zip(call["bindings"], values[2 + npod:],
                                                                    kernel["bindings"]))
        pipeline = variant.pipelines[call["kernel"]]
        return ((pipeline, kernel, bound, c_i * slot, (x, gy, gz)),
                (pipeline, sess.bind_group(variant, kernel, bound, c_i * slot), (x, gy, gz)))


class DeviceTensor:
    """A tensor on the session's device: ``nbytes`` at ``offset`` of ``buffer``, ``shape``, the model's
    ``dtype`` and the device's (int64 is int32 there).  Made by :meth:`Session.device_tensor` (it owns
    its buffer) or returned by :meth:`Session.run_device` (a view of that run's buffers: ``run`` is the
    run's number, and the view is valid until the next run)."""

    def __init__(self, sess: Session, buffer, offset: int, shape: tuple, dtype: str, ddtype: str,
                 run: int | None = None):
        self.session, self.buffer, self.offset = sess, buffer, offset
        self.shape, self.dtype, self.ddtype, self.run = tuple(int(d) for d in shape), dtype, ddtype, run
        self.nbytes = int(np.prod(self.shape)) * np.dtype(ddtype).itemsize

    def numpy(self) -> np.ndarray:
        """The tensor on the host, in the model's dtype (waits for the run that writes it)."""
        return self.session.download(self)

    def __repr__(self) -> str:
        return f"DeviceTensor(shape={list(self.shape)}, dtype={self.dtype}, run={self.run})"


class _Pool:
    """Device buffers by slot, each at least as large as asked, grown by doubling (a slot's old buffer
    stays alive as long as bind groups of other shape sets use it)."""

    def __init__(self, device):
        self.device = device
        self.buffers: dict = {}

    def get(self, key, nbytes: int, usage=None):
        buf = self.buffers.get(key)
        need = max(16, -(-nbytes // 16) * 16)
        if buf is None or buf.size < need:
            size = need if buf is None else max(need, 2 * buf.size)
            buf = self.buffers[key] = self.device.create_buffer(size=size, usage=usage or _storage_usage())
        return buf


def _storage_usage():
    import wgpu  # noqa: PLC0415

    return wgpu.BufferUsage.STORAGE | wgpu.BufferUsage.COPY_DST | wgpu.BufferUsage.COPY_SRC


class Session(DecoderMethods):
    """A loaded Vulkan artifact: ``run(output_names, feeds)`` returns a list of numpy arrays.

    ``params``: arrays (name -> numpy) to use instead of ``params.safetensors``, which then need not be
    there (benchmarks with generated weights), with the names, shapes and dtypes of the artifact's.
    """

    def __init__(self, path: str | Path, device=None, params: dict | None = None):
        root = Path(path)
        self.path = root
        self.manifest = read_manifest(root)
        device_kind = self.manifest["target"].get("device")
        if device_kind != "vulkan":
            raise ArtifactError(f"{root}: compiled for device {device_kind!r}, not 'vulkan'")
        verify_files(root, self.manifest, skip=(PARAMS,) if params is not None else ())
        for required in required_files("vulkan"):
            if required not in self.manifest["files"]:
                raise ArtifactError(f"{root}: manifest lists no {required}")
        self.plan = plan = json.loads((root / PLAN).read_text())
        if plan.get("format") != PLAN_FORMAT:
            raise ArtifactError(f"{root}: plan format {plan.get('format')}, this runtime reads {PLAN_FORMAT}")
        kernels = [k for v in plan["variants"] for k in v["kernels"]]
        features = ("shader-f16",) if any(k["f16"] for k in kernels) else ()
        self.device = device if device is not None else request_device(features)
        self._exprs: dict[str, object] = {}
        self.inputs = [NodeArg(i["name"], i["dtype"], tuple(i["shape"])) for i in self.manifest["inputs"]]
        self.outputs = [NodeArg(o["name"], o["dtype"], tuple(o["shape"])) for o in self.manifest["outputs"]]
        for v in plan["variants"]:
            if len(self.inputs) != len(v["inputs"]) or len(self.outputs) != len(v["outputs"]):
                raise ArtifactError(f"{root}: plan.json and the manifest disagree on the inputs or outputs")
        sources = _split_sources((root / KERNELS_WGSL).read_text())
        self.variants = [_Variant(self, v, sources) for v in plan["variants"]]
        self.input_specs = plan["variants"][-1]["inputs"]  # the general variant binds the symbolic dims
        self.fixed = self._upload_fixed(root, params)
        self.pool = _Pool(self.device)
        self._programs: OrderedDict = OrderedDict()
        self._bind_groups: dict = {}  # (kernel, buffers and offsets, uniform slot) -> (bind group, buffers)
        self._last: dict = {}  # variant id -> its last program made (the base of the next)
        self.runs = 0  # runs submitted (DeviceTensor views of the outputs carry their run's number)
        self._generator = None
        self.gpu_seconds: float | None = None  # set by time_calls where the device has timestamp queries
        self.encode_seconds: float | None = None  # time_calls: recording one pass (CPU, Python + wgpu)
        log.info("loaded %s: %d plan variants, %d kernels, %d parameter buffers", root, len(self.variants),
                 len(kernels), len(self.fixed))

    # -- load ---------------------------------------------------------------------------------------

    def exprs(self, text, env: dict) -> int:
        f = self._exprs.get(text)
        if f is None:
            f = self._exprs[text] = compile_expr(text)
        return int(f(env))

    def _upload_fixed(self, root: Path, given: dict | None = None) -> dict:
        from safetensors.numpy import load_file  # noqa: PLC0415

        arrays = dict(load_file(str(root / PARAMS)) if given is None else given)
        if "constants.safetensors" in self.manifest["files"]:
            arrays.update(load_file(str(root / "constants.safetensors")))
        out = {}
        for spec in (b for v in self.plan["variants"] for b in v["buffers"]):
            if spec["kind"] not in ("param", "const") or spec["name"] in out:
                continue
            name = spec["name"]
            if name not in arrays:
                raise ArtifactError(f"{root}: no parameter {name} in {PARAMS}")
            a = self._to_device(arrays[name], name)
            out[name] = self.device.create_buffer_with_data(data=_padded(a), usage=_storage_usage())
        return out

    def _to_device(self, a: np.ndarray, what: str) -> np.ndarray:
        dtype = _device_dtype(self.plan, str(a.dtype))
        if dtype not in _DEVICE_NUMPY:
            raise QCompileError(f"{self.path}: {what} has dtype {a.dtype}, which the Vulkan runtime cannot hold")
        if dtype != str(a.dtype):
            info = np.iinfo(dtype)
            if a.size and (a.min() < info.min or a.max() > info.max):
                raise QCompileError(f"{self.path}: {what} has values outside {dtype} (the device's integer width)")
            a = a.astype(dtype)
        return np.ascontiguousarray(a)

    # -- run ----------------------------------------------------------------------------------------

    def get_inputs(self) -> list[NodeArg]:
        return list(self.inputs)

    def get_outputs(self) -> list[NodeArg]:
        return list(self.outputs)

    def _bind(self, feeds: dict) -> tuple[list[np.ndarray], dict]:
        names = [i.name for i in self.inputs]
        unknown = sorted(set(feeds) - set(names))
        missing = [n for n in names if n not in feeds]
        if unknown or missing:
            raise QCompileError(f"{self.path}: inputs do not match the model: expected {names}, "
                                f"missing {missing}, unknown {unknown}")
        return self._check_values([np.asarray(feeds[n]) for n in names])

    def _check_values(self, values: list) -> tuple[list, dict]:
        """Inputs in the model's order (numpy arrays, narrowed here to the device's dtypes, or this
        session's live DeviceTensors) checked against the model, and the symbolic dims they bind."""
        out, env = [], {}
        for spec, v in zip(self.inputs, values):
            if isinstance(v, DeviceTensor):
                self._check_live(v, f"input {spec.name!r}")
            else:
                v = np.asarray(v)
            dtype, shape = np.dtype(v.dtype), tuple(v.shape)
            if dtype != np.dtype(spec.dtype):
                raise QCompileError(f"{self.path}: input {spec.name!r} expects dtype {spec.dtype}, found {dtype}")
            if len(shape) != len(spec.shape) or any(isinstance(d, int) and d != s for d, s in zip(spec.shape, shape)):
                raise QCompileError(f"{self.path}: input {spec.name!r} expects shape {list(spec.shape)}, "
                                    f"found {list(shape)}")
            out.append(v if isinstance(v, DeviceTensor) else self._to_device(v, f"input {spec.name!r}"))
        for name, (i, d) in self.plan["variants"][-1]["shape_vars"].items():
            env[name] = int(out[i].shape[d])
        for spec, v in zip(self.input_specs, out):  # dims that are expressions of the bound ones
            want = [self.exprs(d, env) for d in spec["shape"]]
            if list(v.shape) != want:
                raise QCompileError(f"{self.path}: input {spec['name']!r} has shape {list(v.shape)}, the other "
                                    f"inputs make it {want}")
        return out, env

    def _check_live(self, t: DeviceTensor, what: str) -> None:
        if t.session is not self:
            raise QCompileError(f"{self.path}: {what} is a device tensor of another session ({t.session.path})")
        if t.run is not None and t.run != self.runs:
            raise QCompileError(f"{self.path}: {what} is an output of run {t.run}, overwritten by run {self.runs}: "
                                f"outputs of run_device stay valid until the next run (call .numpy() to keep one)")

    def bind_group(self, variant: _Variant, kernel: dict, bound: tuple, pod_offset: int):
        """The bind group of ``kernel`` over ``bound`` ((buffer, offset) per binding, each to the buffer's
        end) and its uniform slot, made once (cached by the buffers' identities, kept alive here)."""
        key = (id(variant), kernel["id"], tuple((id(b), off) for b, off in bound),
               pod_offset if kernel["pod"] else -1)
        hit = self._bind_groups.get(key)
        if hit is None:
            entries = [{"binding": j, "resource": {"buffer": b, "offset": off, "size": b.size - off}}
                       for j, (b, off) in enumerate(bound)]
            if kernel["pod"]:
                entries.append({"binding": len(entries), "resource": {
                    "buffer": variant.uniform, "offset": pod_offset, "size": 4 * len(kernel["pod"])}})
            group = self.device.create_bind_group(layout=variant.layouts[kernel["id"]], entries=entries)
            hit = self._bind_groups[key] = (group, [b for b, _ in bound])
        return hit[0]

    def _write(self, prog: _Program, values: list, encoder=None) -> None:
        """A run's uploads: the uniform values of its shape set and the inputs: numpy arrays written
        through the queue, device tensors copied into the input buffers by ``encoder`` (first in the
        run's command buffer: before any dispatch overwrites the run they came from)."""
        queue = self.device.queue
        for buf, v in zip(prog.inputs, values):
            if isinstance(v, DeviceTensor):
                size = min(-(-v.nbytes // 4) * 4, v.buffer.size - v.offset)
                if size and v.buffer is not buf:
                    encoder.copy_buffer_to_buffer(v.buffer, v.offset, buf, 0, size)
            elif v.nbytes:
                queue.write_buffer(buf, 0, _padded(v))
        queue.write_buffer(prog.variant.uniform, 0, prog.pods)

    def device_tensor(self, a: np.ndarray) -> DeviceTensor:
        """``a`` uploaded into a buffer of its own (for :meth:`run_device`)."""
        a = np.asarray(a)
        d = self._to_device(a, "a device tensor")
        buf = self.device.create_buffer_with_data(data=_padded(d), usage=_storage_usage())
        return DeviceTensor(self, buf, 0, a.shape, str(a.dtype), str(d.dtype))

    def run_device(self, args: list) -> list[DeviceTensor]:
        """Run on inputs in the model's order (DeviceTensors or numpy arrays); returns the outputs as
        DeviceTensors without waiting for the run (valid until the next run)."""
        if len(args) != len(self.inputs):
            raise QCompileError(f"{self.path}: expected {len(self.inputs)} inputs, got {len(args)}")
        values, env = self._check_values(list(args))
        prog = self._program(env)
        encoder = self.device.create_command_encoder()
        self._write(prog, values, encoder)
        self._encode(encoder, prog)
        self.device.queue.submit([encoder.finish()])
        self.runs += 1
        return [DeviceTensor(self, src, offset, shape, dtype, ddtype, self.runs)
                for src, offset, _size, _at, shape, ddtype, dtype, _nbytes in prog.outputs]

    def download(self, t: DeviceTensor) -> np.ndarray:
        """``t`` on the host in the model's dtype (one copy into the read-back buffer, one mapping)."""
        import wgpu  # noqa: PLC0415

        self._check_live(t, "the tensor")
        if not t.nbytes:
            return np.zeros(t.shape, t.dtype)
        size = min(-(-t.nbytes // 4) * 4, t.buffer.size - t.offset)
        read = self.pool.get("read", size, wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        encoder = self.device.create_command_encoder()
        encoder.copy_buffer_to_buffer(t.buffer, t.offset, read, 0, size)
        self.device.queue.submit([encoder.finish()])
        read.map_sync(wgpu.MapMode.READ, 0, size)
        data = np.frombuffer(read.read_mapped(0, size), np.uint8)[:t.nbytes].view(t.ddtype).reshape(t.shape)
        out = data.astype(t.dtype) if t.ddtype != t.dtype else data.copy()
        read.unmap()
        return out

    def _program(self, env: dict) -> _Program:
        key = tuple(sorted(env.items()))
        prog = self._programs.get(key)
        if prog is None:
            variant = next(v for v in self.variants if all(env.get(k) == x for k, x in v.when.items()))
            prog = self._programs[key] = _Program(self, variant, env, self._last.get(id(variant)))
            self._last[id(variant)] = prog
            while len(self._programs) > _SHAPE_SETS:
                self._programs.popitem(last=False)
        else:
            self._programs.move_to_end(key)
        return prog

    def run(self, output_names: list[str] | None, feeds: dict) -> list[np.ndarray]:
        """Run the model; ``output_names=None`` returns every output in the model's order."""
        import wgpu  # noqa: PLC0415

        arrays, env = self._bind(feeds)
        prog = self._program(env)
        read = self.pool.get("read", prog.read_bytes, wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        encoder = self.device.create_command_encoder()
        self._write(prog, arrays, encoder)
        self._encode(encoder, prog)
        for src, offset, size, at, *_ in prog.outputs:
            encoder.copy_buffer_to_buffer(src, offset, read, at, size)
        self.device.queue.submit([encoder.finish()])
        self.runs += 1
        read.map_sync(wgpu.MapMode.READ, 0, prog.read_bytes)  # one mapping for every output
        raw = np.frombuffer(read.read_mapped(0, prog.read_bytes), np.uint8)
        read.unmap()
        results = {}
        for o, (_src, _offset, _size, at, shape, ddtype, _dtype, nbytes) in zip(self.outputs, prog.outputs):
            data = raw[at:at + nbytes].view(ddtype).reshape(shape)
            results[o.name] = data.astype(o.dtype) if ddtype != o.dtype else data.copy()
        if output_names is None:
            output_names = [o.name for o in self.outputs]
        unknown = [n for n in output_names if n not in results]
        if unknown:
            raise QCompileError(f"{self.path}: no outputs named {unknown}; outputs are {list(results)}")
        return [results[n] for n in output_names]

    def time_calls(self, feeds: dict, reps: int = 100, copies: int = 1, rounds: int = 5) -> float:
        """Median seconds of one pass over the plan's calls on the device (no uploads or downloads).

        Each round records ``reps`` passes over the calls in one compute pass of one command buffer;
        pass ``i`` binds copy ``i % copies`` of the parameters (``copies`` > 1 keeps the weights from
        coming out of a cache).  The time is from submit to the result's mapping (CPU clock); on a device
        with the ``timestamp-query`` feature, :attr:`gpu_seconds` is also set: the median GPU time of one
        pass by timestamps at the compute pass's start and end (nanosecond ticks, as on NVIDIA and Mesa).
        For benchmarks (``bench/gpu/vulkan.py``); the outputs of the last pass are those of ``run``.
        """
        import time  # noqa: PLC0415

        import wgpu  # noqa: PLC0415

        arrays, env = self._bind(feeds)
        prog = self._program(env)
        self._write(prog, arrays)
        self.runs += 1  # (the passes below overwrite what earlier runs' outputs view)
        variants = [prog.bind_groups] + [self._rebind(prog, self._copy_fixed()) for _ in range(copies - 1)]
        src, offset = prog.outputs[0][:2]
        read = self.device.create_buffer(size=16, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        stamps = "timestamp-query" in self.device.features
        if stamps:
            queries = self.device.create_query_set(type="timestamp", count=2)
            resolved = self.device.create_buffer(size=16, usage=wgpu.BufferUsage.QUERY_RESOLVE | wgpu.BufferUsage.COPY_SRC)
            ticks = self.device.create_buffer(size=16, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        times, gpu, encode = [], [], []
        for _ in range(rounds + 1):  # the first round warms up
            t_enc = time.perf_counter()
            encoder = self.device.create_command_encoder()
            writes = {"query_set": queries, "beginning_of_pass_write_index": 0, "end_of_pass_write_index": 1} \
                if stamps else None
            cpass = encoder.begin_compute_pass(timestamp_writes=writes)
            for i in range(reps):
                self._dispatch(cpass, variants[i % copies])
            cpass.end()
            if stamps:
                encoder.resolve_query_set(queries, 0, 2, resolved, 0)
                encoder.copy_buffer_to_buffer(resolved, 0, ticks, 0, 16)
            encoder.copy_buffer_to_buffer(src, offset, read, 0, 4)  # mapping it waits for the passes
            buffer = encoder.finish()
            t0 = time.perf_counter()
            encode.append((t0 - t_enc) / reps)
            self.device.queue.submit([buffer])
            read.map_sync(wgpu.MapMode.READ)
            times.append((time.perf_counter() - t0) / reps)
            read.unmap()
            if stamps:
                ticks.map_sync(wgpu.MapMode.READ)
                t = np.frombuffer(ticks.read_mapped(0, 16), np.uint64).astype(np.int64)
                gpu.append(float(t[1] - t[0]) * 1e-9 / reps)
                ticks.unmap()
        self.gpu_seconds = float(np.median(gpu[1:])) if stamps else None
        self.encode_seconds = float(np.median(encode[1:]))
        return float(np.median(times[1:]))

    def profile_calls(self, feeds: dict) -> list[tuple[str, float]]:
        """(kernel name, seconds) of each call of one run, each call submitted and waited for alone."""
        import time  # noqa: PLC0415

        import wgpu  # noqa: PLC0415

        arrays, env = self._bind(feeds)
        prog = self._program(env)
        self._write(prog, arrays)
        self.runs += 1  # (the passes below overwrite what earlier runs' outputs view)
        src, offset = prog.outputs[0][:2]
        read = self.device.create_buffer(size=16, usage=wgpu.BufferUsage.MAP_READ | wgpu.BufferUsage.COPY_DST)
        out = []
        for group, (_, kernel, *_rest) in zip(prog.bind_groups, prog.dispatches):
            encoder = self.device.create_command_encoder()
            cpass = encoder.begin_compute_pass()
            cpass.set_pipeline(group[0])
            cpass.set_bind_group(0, group[1])
            cpass.dispatch_workgroups(*group[2])
            cpass.end()
            encoder.copy_buffer_to_buffer(src, offset, read, 0, 4)
            t0 = time.perf_counter()
            self.device.queue.submit([encoder.finish()])
            read.map_sync(wgpu.MapMode.READ)
            out.append((kernel["name"], time.perf_counter() - t0))
            read.unmap()
        return out

    def _copy_fixed(self) -> dict:
        encoder = self.device.create_command_encoder()
        out = {}
        for name, buf in self.fixed.items():
            out[name] = self.device.create_buffer(size=buf.size, usage=_storage_usage())
            encoder.copy_buffer_to_buffer(buf, 0, out[name], 0, buf.size)
        self.device.queue.submit([encoder.finish()])
        return out

    def _rebind(self, prog: _Program, fixed: dict) -> list:
        """``prog``'s bind groups with the parameter buffers replaced by ``fixed``."""
        swap = {id(self.fixed[n]): fixed[n] for n in fixed}
        out = []
        for pipeline, kernel, bound, pod_offset, grid in prog.dispatches:
            bound = tuple((swap.get(id(b), b), off) for b, off in bound)
            out.append((pipeline, self.bind_group(prog.variant, kernel, bound, pod_offset), grid))
        return out

    @classmethod
    def _encode(cls, encoder, prog: _Program, bind_groups=None) -> None:
        cpass = encoder.begin_compute_pass()
        cls._dispatch(cpass, bind_groups or prog.bind_groups)
        cpass.end()

    @staticmethod
    def _dispatch(cpass, bind_groups) -> None:
        native = _native_pass(cpass)
        if native is None:
            for pipeline, group, (x, y, z) in bind_groups:
                cpass.set_pipeline(pipeline)
                cpass.set_bind_group(0, group)
                cpass.dispatch_workgroups(x, y, z)
            return
        # wgpu-native's entry points directly (wgpu-py's wrappers cost ~1 us a dispatch in argument
        # handling; this session keeps every pipeline and bind group alive), a pipeline set only when it
        # changes
        enc, set_pipeline, set_bind_group, dispatch, null = native
        last = None
        for pipeline, group, (x, y, z) in bind_groups:
            if pipeline is not last:
                set_pipeline(enc, pipeline._internal)
                last = pipeline
            set_bind_group(enc, 0, group._internal, 0, null)
            dispatch(enc, x, y, z)


def _native_pass(cpass):
    """(encoder handle, SetPipeline, SetBindGroup, DispatchWorkgroups, NULL) of wgpu-native for a compute
    pass of wgpu-py's native backend; None for anything else (then the public API is used)."""
    try:
        from wgpu.backends.wgpu_native import _api  # noqa: PLC0415
    except ImportError:
        return None
    if type(cpass) is not getattr(_api, "GPUComputePassEncoder", None) or not hasattr(cpass, "_internal"):
        return None
    try:
        lib = _api.libf
        return (cpass._internal, lib.wgpuComputePassEncoderSetPipeline, lib.wgpuComputePassEncoderSetBindGroup,  # noqa: SLF001
                lib.wgpuComputePassEncoderDispatchWorkgroups, _api.ffi.NULL)
    except AttributeError:
        return None


def _padded(a: np.ndarray) -> bytes:
    """``a``'s bytes padded to a multiple of 16 (at least 16: wgpu buffers are never empty)."""
    data = a.tobytes()
    return data + b"\0" * (-len(data) % 16 or (16 if not data else 0))


def load(path: str | Path, device=None, params: dict | None = None) -> Session:
    """Load the Vulkan artifact at ``path`` (a ``.qcm`` directory)."""
    return Session(path, device, params)

