#!/usr/bin/env bash
# Prepare .gpu/ (git-ignored through .git/info/exclude) for bench/gpu/gpu_check.py on the GPU machine:
#   .gpu/site/tvm   the installed tvm package without the compiler library, sources, headers, 3rdparty (16 MB)
#   .gpu/whl        wheels for the GPU machine's Python 3.12: apache-tvm-ffi; wgpu, cffi, pycparser, rendercanvas
#   .gpu/gl         the Vulkan loader and GL dispatch debs (the device README's recipe; unpacked into / there)
#   .gpu/build      kernels, artifacts and CPU references (gpu_check build)
#   .gpu/decode     SmolLM2 (CUDA, Vulkan) and 1.1B Llama (CUDA) artifacts without their params
#                   (python -m bench.gpu.decode build; the params are generated there)
#   .gpu/vulkan     Vulkan GEMV plans and test models (python -m bench.gpu.vulkan build)
# then run there.  Since the CUDA decoders carry a decode_step (their module.so doubled: 40 MB of .gpu/decode),
# everything does not travel at once (64 MiB): two calls back to back on one lease (session 7's gpu.json),
#   1. carry [".gpu/site", ".gpu/whl", ".gpu/gl", ".gpu/build", ".gpu/vulkan"]: the command below (no decode/);
#   2. carry [".gpu/site", ".gpu/whl", ".gpu/gl", ".gpu/dec7"] where .gpu/dec7/decode is .gpu/decode without the
#      *-fa builds (and models.json without them): python3 -m bench.gpu.decode run --gpu-root .gpu/dec7
#      --json $OUT/decode.json, then its "decode" rows go into gpu.json;
#   for f in .gpu/gl/*.deb; do dpkg -x $f /; done; ldconfig;
#   export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json XDG_RUNTIME_DIR=$(mktemp -d);
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target .gpu/pysite .gpu/whl/*.whl &&
#   mkdir -p .gpu/ns/qcompile && for d in runtime passes targets compiler; do ln -sfn $PWD/$d .gpu/ns/qcompile/$d; done &&
#   PYTHONPATH=$PWD/.gpu/pysite:$PWD/.gpu/site:$PWD/.gpu/ns:$PWD TVM_USE_RUNTIME_LIB=1 python3 -m bench.gpu.gpu_check run \
#       --dir .gpu/build --json $OUT/gpu.json          (then copy $OUT/gpu.json to bench/results/gpu.json)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info && (grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude)
tvm_dir=$(python3 -c "import os, tvm; print(os.path.dirname(tvm.__file__))")
rm -rf .gpu/site && mkdir -p .gpu/site .gpu/whl .gpu/gl
tar -C "$(dirname "$tvm_dir")" --exclude=tvm/lib/libtvm_compiler.so --exclude=tvm/3rdparty --exclude=tvm/src \
    --exclude=tvm/include --exclude=tvm/web --exclude=__pycache__ -cf - tvm | tar -C .gpu/site -xf -
ffi=$(python3 -c "import importlib.metadata as m; print(m.version('apache-tvm-ffi'))")
wheels() {
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .gpu/whl "$@"
}
ls .gpu/whl/apache_tvm_ffi-"$ffi"-cp312-*.whl >/dev/null 2>&1 || wheels "apache-tvm-ffi==$ffi"
ls .gpu/whl/wgpu-*.whl >/dev/null 2>&1 || wheels wgpu==0.32.0 cffi==2.0.0 pycparser rendercanvas==2.7.2
if ! ls .gpu/gl/libvulkan1_*.deb >/dev/null 2>&1; then
    lists=$(mktemp -d)
    o="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=$lists"
    mkdir -p "$lists/partial" && apt-get $o update -qq &&
        (cd .gpu/gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)
fi
python3 -m bench.gpu.gpu_check build --dir .gpu/build
[ -f .gpu/decode/models.json ] || python3 -m bench.gpu.decode build --dir .gpu/decode
[ -d .gpu/vulkan ] || python3 -m bench.gpu.vulkan build --dir .gpu/vulkan
du -sh .gpu .gpu/*
