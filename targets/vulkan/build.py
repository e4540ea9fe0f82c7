"""Build a lowered Relax module into WGSL kernels and a call plan (``kernels.wgsl`` + ``plan.json``).

TVM's generic GPU pipeline (dlight schedules) runs up to memory planning, so ``main`` is a flat
sequence of storage allocations, tensor views and calls of PrimFuncs.  Each PrimFunc is lowered like
``tvm.tirx.build`` up to ``SplitHostDevice``: its host half is a list of ``call_ffi_kernel`` launches
(buffers, scalar arguments, grid and block sizes as expressions of the buffers' shapes), its device
half becomes one WGSL compute shader by TVM's webgpu codegen.  Indices are forced to 32 bits first
(WGSL has no 64-bit integers; int64 tensors live on the device as int32).

The plan (:mod:`qcompile.runtime.vulkan` executes it) holds variants (a decode-step specialization
first for KV-cache models, then the general one), each recording in ``main``'s order:

    buffers   input i | param NAME | const NAME | storage of BYTES bytes
    calls     kernel, [buffer, byte offset] per WGSL binding, uniform (POD) values, grid (x, y, z)
    outputs   buffer, byte offset, shape, dtype

Sizes, offsets, uniform values and grids are expressions (Python syntax: ints, names, + - * // %,
min, max) of the model's symbolic dims, which the runtime binds from the input shapes (``shape_vars``).
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from ..decode_step import bind_decode_step, decode_binding, is_shape_var

__all__ = ["build_plan", "relax_pipeline", "with_gemv_kernels", "PLAN_FORMAT"]

log = logging.getLogger(__name__)

PLAN_FORMAT = 2
_KERNEL_MARK = "// qcompile-kernel: "
_DEVICE_DTYPE = {"int64": "int32", "bool": "int32"}  # how .narrow keeps them on the device


def relax_pipeline(target):
    """TVM's generic GPU pipeline (dlight schedules) up to memory planning, without the VM lowering."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.backend import gpu_generic as gpu  # noqa: PLC0415

    from ..x86.build import _with_scalar_producers_unfused  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                [relax.transform.DecomposeOpsForInference()]
                + gpu.library_dispatch_passes(target)
                + _with_scalar_producers_unfused(_without_fold_constant(gpu.legalize_passes(target)))
                + gpu.dataflow_lower_passes(target)
                + [relax.transform.StaticPlanBlockMemory(), relax.transform.LowerAllocTensor(),
                   relax.transform.AttachGlobalSymbol()]
            )
            return seq(mod)

    return _pipeline


def _without_fold_constant(passes: list) -> list:
    """Without ``FoldConstant``: it would turn .narrow's ``astype(int32 constant, bool)`` back into a
    bool buffer (WGSL storage has no 8-bit type); from_onnx folded the shape arithmetic already."""
    return [p for p in passes if p.info.name != "FoldConstant"]


def _tir_passes():
    """``tvm.s_tir.pipeline.default_s_tir_pipeline`` up to and including ``SplitHostDevice``."""
    from tvm import s_tir, tirx  # noqa: PLC0415

    st, tx = s_tir.transform, tirx.transform
    return [
        st.CanonicalizeLoop(), st.LowerCrossThreadReduction(), st.LowerInitBlock(),
        st.PlanAndUpdateBufferAllocationLocation(), st.ConvertBlocksToOpaque(), st.LiftThreadBinding(),
        st.ManifestSharedMemoryLocalStage(), st.CompactBufferAllocation(), st.LowerAutoCopy(),
        st.UnifyThreadBinding(), st.LowerMatchBuffer(), st.StmtSimplify(), st.InjectPermutedLayout(),
        st.AnnotateIrregularLoop(), st.InjectSoftwarePipeline(), st.TransformMmaBufferLayout(),
        st.LowerOpaqueBlock(), tx.FlattenBuffer(), tx.BF16ComputeLegalize(), tx.NarrowDataType(32),
        st.LoopPartition(), tx.VectorizeLoop(True), st.InjectVirtualThread(), st.InjectDoubleBuffer(),
        tx.StorageRewrite(), st.HoistIfThenElse(), tx.UnrollLoop(), st.RenormalizeSplitPattern(),
        tx.StmtSimplify(), tx.RemoveNoOp(), st.RewriteUnsafeSelect(), tx.CommonSubexprElim(),
        tx.FP8ComputeLegalize(), tx.VerifyMemory(), tx.AnnotateEntryFunc(),
        st.ThreadSync("shared"), st.ThreadSync("shared.dyn"), st.ThreadSync("warp"), st.InferFragment(),
        st.LowerThreadAllreduce(), st.MergeSharedMemoryAllocations(), tx.SplitHostDevice(),
    ]


# -- expressions -------------------------------------------------------------------------------------

_BINOPS = {"Add": "+", "Sub": "-", "Mul": "*", "FloorDiv": "//", "FloorMod": "%", "Div": "//", "Mod": "%"}


def expr_text(e, env: dict[str, str] | None = None) -> str:
    """A TIR integer expression as Python text; ``env`` maps variable names to their text."""
    env = env or {}
    kind = type(e).__name__
    if isinstance(e, int):
        return str(e)
    if kind == "IntImm":
        return str(int(e.value))
    if kind in ("Var", "SizeVar"):
        name = str(e.name)
        return f"({env[name]})" if name in env else name
    if kind in _BINOPS:
        return f"({expr_text(e.a, env)} {_BINOPS[kind]} {expr_text(e.b, env)})"
    if kind in ("Min", "Max"):
        return f"{kind.lower()}({expr_text(e.a, env)}, {expr_text(e.b, env)})"
    if kind == "Cast":
        return expr_text(e.value, env)
    raise NotImplementedError(f"vulkan plan: cannot express {kind} {e} as a launch or size expression")


# -- TIR: host launches and WGSL ---------------------------------------------------------------------

def _host_launches(func, kernels: dict) -> tuple[list, dict]:
    """The ``call_ffi_kernel`` launches of a host PrimFunc, in order, and its let-bound names.

    Each launch: (kernel name, [param index of each buffer argument], [scalar exprs], {launch tag: expr}).
    """
    params = list(func.params)
    decls: list[tuple] = []  # (buffer var, the var whose data it views)
    lets: dict[str, object] = {}
    launches = []

    def root(var):
        for i, p in enumerate(params):
            if var.same_as(p):
                return i
        for v, base in decls:
            if var.same_as(v):
                return root(base)
        raise NotImplementedError(f"vulkan plan: {func.attrs['global_symbol']}: buffer {var} is not a parameter")

    def walk(s):
        kind = type(s).__name__
        if kind == "SeqStmt":
            for x in s.seq:
                walk(x)
        elif kind == "Bind":
            lets[str(s.var.name)] = s.value
        elif kind == "DeclBuffer":
            data = s.data
            if type(data).__name__ == "Call" and data.op.name == "tirx.buffer_data":
                decls.append((s.buffer, data.args[0]))
        elif kind == "AssertStmt":
            pass
        elif kind == "AttrStmt":
            walk(s.body)
        elif kind == "Evaluate" and type(s.value).__name__ == "Call" and s.value.op.name == "tirx.call_ffi_kernel":
            call = s.value
            name = str(call.args[0].value)
            kernel = kernels[name]
            n_handles = sum(1 for p in kernel.params if str(p.ty).startswith("handle") or
                            "PointerType" in type(p.ty).__name__)
            n_scalars = len(kernel.params) - n_handles
            args = list(call.args[1:])
            bufs = [root(a.args[0]) for a in args[:n_handles]]
            scalars = args[n_handles:n_handles + n_scalars]
            tags = [str(t) for t in call.attrs.launch_params]
            launch = dict(zip(tags, args[n_handles + n_scalars:]))
            launches.append((name, bufs, scalars, launch))
        elif kind == "Evaluate" and type(s.value).__name__ == "IntImm":
            pass
        else:
            raise NotImplementedError(f"vulkan plan: {func.attrs['global_symbol']}: host code {kind} is not a "
                                      f"kernel launch:\n{s}")

    walk(func.body)
    return launches, lets


def _wgsl(kernel_mod, target) -> str:
    from tvm.s_tir.pipeline import finalize_device_passes  # noqa: PLC0415
    from tvm.tirx.build import codegen_build  # noqa: PLC0415

    src = codegen_build(finalize_device_passes()(kernel_mod), target).inspect_source()
    # a bool tensor that .narrow could not keep out of a kernel (a bool constant FuseOps passes in) is read
    # as i8, which WGSL lacks: the runtime stores bools as int32 and the kernel reads them with bool(...)
    return re.sub(r"(var<storage, read> \w+ : array<)i8>", r"\1i32>", src)


_POD = re.compile(r"struct PODArgs \{(.*?)\}", re.S)
_BINDING = re.compile(r"@group\(0\) @binding\((\d+)\) var<(storage|uniform)(?:, (read|read_write))?>")


def _bindings(src: str) -> list[str]:
    """Access of each storage binding in binding order ("read" / "read_write"); the uniform comes last."""
    found = sorted((int(i), kind, access) for i, kind, access in _BINDING.findall(src))
    if [i for i, _, _ in found] != list(range(len(found))):
        raise NotImplementedError(f"vulkan plan: unexpected WGSL bindings {found}")
    storage = [access for _, kind, access in found if kind == "storage"]
    if any(kind == "uniform" for _, kind, _ in found[:len(storage)]):
        raise NotImplementedError(f"vulkan plan: the uniform binding is not last: {found}")
    return storage


def _pod_types(src: str) -> list[str]:
    m = _POD.search(src)
    if not m:
        return []
    return [f.split(":")[1].strip() for f in m.group(1).split(",") if ":" in f]


# -- Relax main: the plan ----------------------------------------------------------------------------

class _Planner:
    def __init__(self, mod, lowered_tir, kernels, param_names: list[str], num_inputs: int):
        self.mod, self.tir, self.kernels = mod, lowered_tir, kernels
        self.param_names, self.num_inputs = param_names, num_inputs
        self.buffers: list[dict] = []
        self.calls: list[dict] = []
        self.constants: dict[str, np.ndarray] = {}
        self.values: dict = {}  # relax Var -> tensor view dict, or tuple of them
        self.shape_vars: dict[str, list[int]] = {}
        self.inputs: list[dict] = []
        self.used_kernels: dict[str, int] = {}

    def tensor(self, buffer: int, offset, shape, dtype: str) -> dict:
        return {"buffer": buffer, "offset": expr_text(offset), "shape": [expr_text(d) for d in shape],
                "dtype": dtype}

    def value(self, e):
        import tvm  # noqa: PLC0415
        from tvm import relax  # noqa: PLC0415

        if isinstance(e, relax.Var):
            return self.values[e]
        if isinstance(e, tvm.ir.GenericConst):
            arr = e.value.numpy()
            name = f"const_{len(self.constants)}"
            self.constants[name] = np.ascontiguousarray(arr)
            self.buffers.append({"kind": "const", "name": name})
            return self.tensor(len(self.buffers) - 1, 0, arr.shape, str(arr.dtype))
        if isinstance(e, relax.Tuple):
            return tuple(self.value(f) for f in e.fields)
        raise NotImplementedError(f"vulkan plan: unsupported argument {type(e).__name__}: {e}")

    def params(self, func):
        for i, p in enumerate(func.params):
            ty = p.ty
            shape = list(ty.shape.values)
            if i < self.num_inputs:
                self.buffers.append({"kind": "input", "index": i})
                for d, dim in enumerate(shape):
                    if is_shape_var(dim) and str(dim.name) not in self.shape_vars:
                        self.shape_vars[str(dim.name)] = [i, d]
                self.inputs.append({"name": str(p.name), "dtype": str(ty.dtype),
                                    "shape": [expr_text(d) for d in shape]})
            else:
                self.buffers.append({"kind": "param", "name": self.param_names[i - self.num_inputs]})
            self.values[p] = self.tensor(len(self.buffers) - 1, 0, shape, str(ty.dtype))

    def binding(self, var, e):
        import tvm  # noqa: PLC0415
        from tvm import relax, tirx  # noqa: PLC0415

        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            op = e.op.name
            if op == "relax.memory.alloc_storage":
                self.buffers.append({"kind": "storage", "bytes": expr_text(e.args[0].values[0])})
                self.values[var] = len(self.buffers) - 1
            elif op == "relax.memory.alloc_tensor":
                storage = self.values[e.args[0]]
                self.values[var] = self.tensor(storage, e.args[1], e.args[2].values, str(e.args[3].value))
            elif op == "relax.reshape":
                src = self.value(e.args[0])
                self.values[var] = dict(src, shape=[expr_text(d) for d in var.ty.shape.values])
            else:
                raise NotImplementedError(f"vulkan plan: operator {op} in main is not supported")
        elif isinstance(e, relax.Call) and isinstance(e.op, relax.GlobalVar):
            func = self.mod[e.op]
            if not isinstance(func, tirx.PrimFunc):
                raise NotImplementedError(f"vulkan plan: call of a Relax function {e.op.name_hint}")
            args = []
            for a in e.args:
                if isinstance(a, relax.ShapeExpr):
                    args.extend(("scalar", expr_text(v)) for v in a.values)
                elif tvm.ir.is_prim_expr(a):
                    args.append(("scalar", expr_text(a)))
                else:
                    args.append(("tensor", self.value(a)))
            self.call(e.op.name_hint, args)
            self.values[var] = ()
        elif isinstance(e, relax.Var):
            self.values[var] = self.values[e]
        elif isinstance(e, relax.TupleGetItem):
            self.values[var] = self.value(e.tuple_value)[e.index]
        elif isinstance(e, (relax.Tuple, tvm.ir.GenericConst)):
            self.values[var] = self.value(e)
        else:
            raise NotImplementedError(f"vulkan plan: binding {type(e).__name__} in main is not supported: {e}")

    def call(self, name: str, args: list):
        host = self.tir[name]
        env: dict[str, str] = {}
        for p, (kind, a) in zip(host.params, args):
            if kind == "tensor":
                for dim, text in zip(p.ty.shape, a["shape"]):
                    if is_shape_var(dim):
                        env.setdefault(str(dim.name), text)
            else:
                env[str(p.name)] = a
        launches, lets = _host_launches(host, self.kernels)
        for let_name, value in lets.items():
            env[let_name] = expr_text(value, env)
        for kname, bufs, scalars, launch in launches:
            unknown = set(launch) - {"blockIdx.x", "blockIdx.y", "threadIdx.x", "threadIdx.y", "threadIdx.z"}
            if unknown:
                raise NotImplementedError(f"vulkan plan: kernel {kname} launches with {sorted(unknown)}")
            self.used_kernels.setdefault(kname, len(self.used_kernels))
            self.calls.append({
                "kernel": kname,
                "bindings": [[args[i][1]["buffer"], args[i][1]["offset"]] for i in bufs],
                "pod": [expr_text(s, env) for s in scalars],
                "grid": [expr_text(launch.get(t, 1), env) for t in ("blockIdx.x", "blockIdx.y")],
            })

    def outputs(self, ret) -> list[dict]:
        out = self.value(ret)
        return list(out) if isinstance(out, tuple) else [out]


def _plan_variant(mod, param_names: list[str], num_inputs: int, tag: str):
    """One plan for ``mod``: (plan dict, WGSL sources, constants); kernel ids and constants carry ``tag``."""
    import tvm  # noqa: PLC0415
    from tvm import relax, tirx  # noqa: PLC0415

    target = tvm.target.Target({"kind": "webgpu"})
    mod = relax_pipeline(target)(mod)
    host_target = target.with_host(tvm.target.Target({"kind": "llvm"}))
    funcs = {gv: f.without_attr("target") for gv, f in mod.functions.items() if isinstance(f, tirx.PrimFunc)}
    tmod = tirx.transform.BindTarget(host_target)(tvm.IRModule(funcs))
    tmod = tirx.transform.ForceNarrowIndexToInt32()(tmod)
    lowered = tvm.transform.Sequential(_tir_passes())(tmod)
    kernels = {gv.name_hint: f for gv, f in lowered.functions.items()
               if f.attrs.get("calling_conv") is not None and int(f.attrs["calling_conv"]) == 2}
    hosts = {gv.name_hint: f for gv, f in lowered.functions.items() if gv.name_hint not in kernels}

    planner = _Planner(mod, hosts, kernels, param_names, num_inputs)
    main = mod["main"]
    planner.params(main)
    body = main.body
    for block in body.blocks:
        for b in block.bindings:
            if not isinstance(b, relax.VarBinding):
                raise NotImplementedError(f"vulkan plan: binding {type(b).__name__} in main is not supported")
            planner.binding(b.var, b.value)
    outputs = planner.outputs(body.body)

    sources, kernel_meta = [], []
    for kname in planner.used_kernels:
        src = _wgsl(tvm.IRModule({kname: kernels[kname]}), target)
        sources.append(f"{_KERNEL_MARK}{tag}{kname}\n{src.strip()}\n")
        kernel_meta.append({"id": f"{tag}{kname}", "name": kname, "bindings": _bindings(src),
                            "pod": _pod_types(src), "f16": "enable f16" in src})
    index = {k: i for i, k in enumerate(planner.used_kernels)}
    for c in planner.calls:
        c["kernel"] = index[c["kernel"]]
    constants = {f"{tag}{k}": v for k, v in planner.constants.items()}
    for b in planner.buffers:
        if b["kind"] == "const":
            b["name"] = f"{tag}{b['name']}"
    plan = {"inputs": planner.inputs, "shape_vars": planner.shape_vars, "buffers": planner.buffers,
            "kernels": kernel_meta, "calls": planner.calls, "outputs": outputs}
    log.info("vulkan plan %s: %d kernels, %d calls, %d buffers, %d constants", tag.rstrip("/") or "-",
             len(kernel_meta), len(planner.calls), len(planner.buffers), len(constants))
    return plan, sources, constants


def with_gemv_kernels(mod, int8_dot: bool = True, counts: dict | None = None):
    """``mod`` with each quantized matmul (a PrimFunc tagged ``QMATMUL_ATTR`` by .lower) replaced by a
    hand-scheduled GEMV of the same format and shape: for the decode-step variant, where M = 1 but the
    kernels were made for a symbolic M (dlight would give them a tiled matmul).

    The GEMV is :func:`.kernels_int8.gemv_int8` (int8 activations) exactly where the x86 int8 build
    quantizes activations too (:func:`qcompile.targets.cuda.lower.uses_int8`: 2-6 bits, N a multiple of
    8; ``int8_dot``), so a decode step matches the x86 and CUDA builds; it is faster than the float
    :func:`.kernels.gemv` at every one of those widths on NVIDIA (bench/results/gpu_vulkan_int8.json:
    1.14-1.96x).  ``counts`` receives how many of each kind."""
    from tvm import tirx  # noqa: PLC0415

    from qcompile.passes.formats import PRESETS  # noqa: PLC0415

    from ..cuda.lower import uses_int8  # noqa: PLC0415
    from . import kernels, kernels_int8  # noqa: PLC0415

    mod = mod.clone() if hasattr(mod, "clone") else mod
    counts = {} if counts is None else counts
    for gv, f in list(mod.functions.items()):
        attr = f.attrs.get(kernels.QMATMUL_ATTR) if isinstance(f, tirx.PrimFunc) and f.attrs else None
        if attr is None or str(attr[0]) not in PRESETS:
            continue
        fmt, k, n = PRESETS[str(attr[0])], int(attr[1]), int(attr[2])
        if uses_int8(fmt, k, n, int8_dot):
            mod[gv], kind = kernels_int8.gemv_int8(fmt, k, n), "gemv_int8"
        else:
            mod[gv], kind = kernels.gemv(fmt, k, n), "gemv"
        counts[kind] = counts.get(kind, 0) + 1
    log.info("decode-step plan: quantized matmuls as GEMV kernels %s", counts)
    return mod


def build_plan(mod, param_names: list[str], num_inputs: int, out_dir: str | Path, int8_dot: bool = True,
               kernel_counts: dict | None = None) -> list[str]:
    """Compile ``mod`` (the lowered Relax module) and write kernels.wgsl, plan.json (and constants.safetensors
    when ``main`` holds constants) into ``out_dir``; returns the file names written.

    A model with a KV cache gets two variants: one with batch and sequence fixed to 1 (a decode step:
    static shapes, so dlight picks GEMV schedules for its matmuls) and the general one; the runtime
    runs the first whose ``when`` holds.  ``int8_dot`` and ``kernel_counts``: :func:`with_gemv_kernels`'s
    (the decode-step variant's GEMV kinds).
    """
    variants, sources, constants = [], [], {}
    binding = decode_binding(mod, num_inputs)
    specs = [({}, mod)]
    if binding:
        specs.insert(0, (binding, with_gemv_kernels(bind_decode_step(mod, binding), int8_dot, kernel_counts)))
    for i, (when, m) in enumerate(specs):
        plan, srcs, consts = _plan_variant(m, param_names, num_inputs, f"v{i}/")
        variants.append({"when": when, **plan})
        sources += srcs
        constants.update(consts)
    plan = {"format": PLAN_FORMAT, "num_inputs": num_inputs, "device_dtypes": _DEVICE_DTYPE, "variants": variants}
    out_dir = Path(out_dir)
    (out_dir / "kernels.wgsl").write_text("".join(sources))
    (out_dir / "plan.json").write_text(json.dumps(plan, indent=1))
    files = ["kernels.wgsl", "plan.json"]
    if constants:
        from safetensors.numpy import save_file  # noqa: PLC0415

        save_file(constants, str(out_dir / "constants.safetensors"))
        files.append("constants.safetensors")
    return files
