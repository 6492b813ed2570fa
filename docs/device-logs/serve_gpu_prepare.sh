#!/usr/bin/env bash
# Prepare, on this networked machine, what docs/device-logs/serve_gpu.py needs on a GPU machine
# that reaches no network: the `serve` extra's wheels for the device's Python (3.12, manylinux
# x86-64) and the SmolLM2 tokenizer. Everything lands in build/serve-gpu (git-ignored; carry it).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
DEST=build/serve-gpu
mkdir -p "$DEST/wheels" "$DEST/tokenizer"
"$PY" -m pip download -q --only-binary=:all: --python-version 3.12 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST/wheels" fastapi uvicorn sse-starlette prometheus-client httpx
"$PY" - "$DEST/tokenizer" <<'PYEOF'
import sys
from transformers import AutoTokenizer
from tokenskip.models import resolve_model_source
AutoTokenizer.from_pretrained(resolve_model_source("smollm2-135m")).save_pretrained(sys.argv[1])
PYEOF
du -sh "$DEST"
