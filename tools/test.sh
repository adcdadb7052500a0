#!/usr/bin/env bash
# Set up a fresh machine for the test suite and run all of it (slow tests included).
# This is the README's test command and what CI (.ci/run) runs.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# llama-cpp-python builds from source the first time (about 7 minutes on 2 cores); pip caches the wheel.
# Built without llamafile's matmuls: they round a LoRA adapter's small matrices differently for a batch than for
# one token, so replies under the default adapter were not token-identical alone and batched (docs/ARCHITECTURE.md).
export CMAKE_ARGS="${CMAKE_ARGS:-} -DGGML_LLAMAFILE=OFF"
.venv/bin/python -m pip install --quiet -e '.[dev]'
if .venv/bin/python -c "import llama_cpp, sys; sys.exit(b'LLAMAFILE = 1' not in llama_cpp.llama_print_system_info())"; then
    echo "rebuilding llama-cpp-python without llamafile (the installed or cached build has it; about 7 minutes)..."
    .venv/bin/python -m pip install --quiet --force-reinstall --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)"
fi

# The Unity bridge's end-to-end test compiles and runs C# with Mono (Debian's mono-devel).
if ! command -v mcs >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing mono-devel for the Unity bridge test..."
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mono-devel >/dev/null
fi

bash tools/lint.sh
exec .venv/bin/pytest -q "$@"
