"""The artifact spec (DESIGN.md §3): file names, manifest schema, and its checks.

It lives in the runtime so that an app can ship the runtime alone; the compiler imports it from here.

    model.qcm/
      manifest.json        FORMAT_VERSION, inputs/outputs, target, tensors, bpw report, file hashes
      module.so            TVM-built library (Relax VM executable)          device "cpu"
      kernels.wgsl         WGSL kernels + plan.json, their call plan          device "vulkan"
      params.safetensors   packed weights and float constants, fed to ``main`` after the inputs
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import ArtifactError

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST",
    "MODULE",
    "PARAMS",
    "PLAN",
    "KERNELS_WGSL",
    "required_files",
    "sha256_file",
    "read_manifest",
    "verify_files",
    "param_specs",
]

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODULE = "module.so"
PARAMS = "params.safetensors"
PLAN = "plan.json"
KERNELS_WGSL = "kernels.wgsl"


def required_files(device: str) -> tuple[str, ...]:
    """The files an artifact for ``device`` ("cpu" or "vulkan") must list in its manifest."""
    return (PLAN, KERNELS_WGSL, PARAMS) if device == "vulkan" else (MODULE, PARAMS)

_REQUIRED = ("format_version", "target", "inputs", "outputs", "params", "tensors", "bpw", "files")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: str | Path) -> dict:
    """Read and validate ``manifest.json`` of the artifact at ``path`` (the .qcm directory)."""
    root = Path(path)
    if not root.is_dir():
        raise ArtifactError(f"{root}: not a qcompile artifact (expected a directory holding {MANIFEST})")
    mpath = root / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{root}: no {MANIFEST}; is this a qcompile artifact?") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{mpath}: not valid JSON ({e})") from e
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ArtifactError(f"{mpath}: missing keys {missing}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise ArtifactError(
            f"{mpath}: artifact format version {manifest['format_version']}, this runtime reads "
            f"version {FORMAT_VERSION}; recompile the model with this qcompile"
        )
    return manifest


def verify_files(root: str | Path, manifest: dict, skip: tuple[str, ...] = ()) -> None:
    """Check every file the manifest lists against its sha256 (before any library is loaded); the files
    in ``skip`` (e.g. PARAMS when the caller supplies the parameters itself) need not be there."""
    root = Path(root)
    for name, digest in manifest["files"].items():
        if "/" in name or name.startswith("."):
            raise ArtifactError(f"{root}: manifest names an unsafe file path {name!r}")
        if name in skip:
            continue
        fpath = root / name
        if not fpath.is_file():
            raise ArtifactError(f"{root}: file {name} listed in the manifest is missing")
        actual = sha256_file(fpath)
        if actual != digest:
            raise ArtifactError(
                f"{root}: {name} does not match its manifest hash (expected sha256 {digest[:16]}…, "
                f"found {actual[:16]}…); the artifact was modified or damaged, recompile it"
            )


def param_specs(path: str | Path) -> dict[str, dict]:
    """Name -> {"dtype": numpy dtype name, "shape": [...]} of every tensor of a safetensors file, read from
    its header alone (8-byte little-endian length, then JSON): what a runtime given generated parameters
    (``Session(..., params=)``) must be given."""
    import struct  # noqa: PLC0415

    dtypes = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64", "U32": "uint32", "U16": "uint16",
              "U8": "uint8", "BOOL": "bool"}
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {name: {"dtype": dtypes[info["dtype"]], "shape": list(info["shape"])}
            for name, info in header.items() if name != "__metadata__"}
