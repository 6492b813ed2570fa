"""GPU variant of the serving benchmark (`tokenskip bench-serve --device cuda`), for a lent GPU machine.

Not run yet: no GPU was lent in the session that wrote it. It runs here on the CPU with
`--shape tiny --device cpu` (checked), which exercises every step but the GPU.

The GPU machine reaches no network, so everything travels with the working tree:
  bash docs/device-logs/serve_gpu_prepare.sh        # here: serve wheels + the smollm2 tokenizer -> build/serve-gpu
then, on the device (`run` tool, carry ["build/serve-gpu"]):
  python -m pip install -q --no-deps --no-build-isolation . \
    && python -m pip install -q --no-index --find-links build/serve-gpu/wheels fastapi uvicorn sse-starlette \
         prometheus-client httpx \
    && python docs/device-logs/serve_gpu.py --out $OUT --shape 1b

The model is LLaMA-shaped with random weights (the routing cost does not depend on them), built on
the device and saved as a local Hugging Face folder with the SmolLM2 tokenizer (its vocabulary
size is the model's). Both servers (dense, and static-router sparsity 0.3) load it in fp32: the
serve path has no --dtype flag yet. Results: $OUT/serve_gpu.json and serve_gpu.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

SHAPES = {  # hidden, layers, heads, kv heads, intermediate
    "tiny": (64, 4, 4, 2, 128),
    "1b": (2048, 22, 32, 4, 5632),  # TinyLlama-1.1B
    "7b": (4096, 32, 32, 32, 11008),  # LLaMA-2-7B
}


def tokenizer_dir(here: Path) -> Path:
    for cand in (here / "build/serve-gpu/tokenizer", Path.home() / ".cache/tokenskip/models/smollm2-135m"):
        if (cand / "tokenizer.json").is_file():
            return cand
    sys.exit("no tokenizer: run docs/device-logs/serve_gpu_prepare.sh first (it copies the smollm2 tokenizer)")


def build_model(folder: Path, shape: str, tok_dir: Path, device: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    hidden, layers, heads, kv, inter = SHAPES[shape]
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, vocab_size=len(tok),
                      max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--prompt-len", default="512")
    ap.add_argument("--max-tokens", default="64")
    args = ap.parse_args()
    here = Path(__file__).resolve().parents[2]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "model"
    build_model(model_dir, args.shape, tokenizer_dir(here), args.device)
    cmd = [sys.executable, "-c", "from tokenskip.cli import main; main()", "bench-serve", "--backend", "torch",
           "--model", str(model_dir), "--device", args.device, "--sparsity", "0.3", "--concurrency", args.concurrency,
           "--prompt-len", args.prompt_len, "--max-tokens", args.max_tokens, "--mixed-lengths", "--batching", "both",
           "--kv-cache-gb", "8", "--out", str(out / "serve_gpu.json")]
    print(" ".join(cmd), flush=True)
    table = subprocess.run(cmd, check=True, capture_output=True, text=True)
    (out / "serve_gpu.md").write_text(table.stdout)
    print(table.stdout)
    print(table.stderr[-4000:], file=sys.stderr)
    shutil.rmtree(model_dir, ignore_errors=True)  # weights do not travel back
    print(json.dumps(json.loads((out / "serve_gpu.json").read_text())["kv"], indent=2))


if __name__ == "__main__":
    main()
