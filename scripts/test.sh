#!/usr/bin/env bash
# Install everything the tests need, into a virtual environment of the tests' own, then run the suite.
#   bash scripts/test.sh [pytest args]
# The environment is .venv (SFT_VENV to choose another), created here when missing, so a green run
# proves that requirements-dev.txt (and requirements.txt, which it includes) install everything:
# nothing is borrowed from the machine's own Python. Debian's chromium is installed for the browser
# tests if it is missing, and llama.cpp's Python binding is built from its source package (CPU only,
# several minutes the first time): it is the reader that proves our GGUF exports.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi

VENV="${SFT_VENV:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --disable-pip-version-check --upgrade pip
"$PY" -m pip install -q --disable-pip-version-check -r requirements-dev.txt

LLAMA_CPP_VERSION=0.3.36  # llama-cpp-python: built here from source, never a prebuilt wheel
if ! "$PY" -c "import llama_cpp" >/dev/null 2>&1; then
  echo "Building llama-cpp-python $LLAMA_CPP_VERSION from source (CPU only; a few minutes)..."
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF" \
    "$PY" -m pip install -q --disable-pip-version-check --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_VERSION"
fi

exec "$PY" -m pytest "$@"
