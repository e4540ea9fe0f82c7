"""``--target arm``: presets, target JSON, what the manifest records (no qemu, no cross compiler needed)."""

from __future__ import annotations

import pytest
import tvm
from tvm.target import codegen

from qcompile.runtime.errors import QCompileError
from qcompile.targets import BackendOptions, make_backend, resolve_target
from qcompile.targets.arm import PRESETS


def test_presets_agree_with_llvm():
    """Every preset's features are exactly what LLVM's CPU model says of its mcpu (of those we track)."""
    tracked = ("neon", "dotprod", "i8mm", "sve", "sve2")
    for name, preset in PRESETS.items():
        bare = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": preset.mcpu})
        llvm_has = tuple(f for f in tracked if codegen.target_has_features(f, bare))
        assert llvm_has == preset.features, (name, llvm_has, preset.features)


@pytest.mark.parametrize("text,mattr,flags,dot", [
    ("arm:cortex-a76", ["+neon", "+dotprod"], ["asimd", "asimddp"], True),
    ("arm:neoverse-v1", ["+neon", "+dotprod", "+i8mm", "+sve"], ["asimd", "asimddp", "i8mm", "sve"], True),
    ("arm:cortex-a72", ["+neon"], ["asimd"], False),
    ("arm", ["+neon"], ["asimd"], False),
])
def test_presets_resolve_to_an_aarch64_llvm_target(text, mattr, flags, dot):
    spec = resolve_target(text)
    assert spec.to_manifest() == {"name": "arm", "device": "cpu", "arch": "aarch64", "cpu_flags": flags,
                                  "tvm": {"kind": "llvm", "mtriple": "aarch64-linux-gnu",
                                          "mcpu": text.split(":")[1] if ":" in text else "generic", "mattr": mattr}}
    assert make_backend(spec, BackendOptions()).int8_dot is dot
    assert make_backend(spec, BackendOptions(int8_dot=False)).int8_dot is False


def test_a_target_json_with_an_aarch64_triple_is_arm():
    spec = resolve_target('{"kind":"llvm","mtriple":"aarch64-linux-gnu","mcpu":"neoverse-n1"}')
    # the flags are those of the CPU as LLVM models it, mattr or not: the runtime checks what the code may use
    assert (spec.name, spec.arch, spec.cpu_flags) == ("arm", "aarch64", ("asimd", "asimddp"))
    assert make_backend(spec, BackendOptions()).int8_dot  # neoverse-n1 has dotprod
    spec = resolve_target('{"kind":"llvm","mtriple":"aarch64-linux-gnu","mcpu":"cortex-a72","mattr":["+dotprod"]}')
    assert spec.cpu_flags == ("asimd", "asimddp") and make_backend(spec, BackendOptions()).int8_dot


def test_an_unknown_cpu_lists_the_presets():
    with pytest.raises(QCompileError, match="cortex-a76"):
        resolve_target("arm:cortex-x9000")


@pytest.mark.parametrize("machine,expected", [("aarch64", {"fp", "asimd", "asimddp"}), ("x86_64", {"sse4_2", "avx2"})])
def test_the_runtime_reads_the_cpu_features_of_either_architecture(monkeypatch, machine, expected):
    """x86's /proc/cpuinfo lists ISA extensions as "flags", aarch64's as "Features"."""
    from qcompile.runtime import session

    cpuinfo = "processor\t: 0\nflags\t\t: sse4_2 avx2\nFeatures\t: fp asimd asimddp\n"

    class FakePath:
        def __init__(self, path):
            assert path == "/proc/cpuinfo"

        def read_text(self):
            return cpuinfo

    monkeypatch.setattr(session, "Path", FakePath)
    monkeypatch.setattr(session.platform, "machine", lambda: machine)
    assert session._host_cpu_flags() == expected  # noqa: SLF001
