"""Which token ids end a generation: the tokenizer's EOS and every id of the model's
generation_config `eos_token_id` (an int or a list: instruct models list their end-of-turn token,
e.g. `<|im_end|>` or `<|eot_id|>`, beside the EOS), as vLLM and `transformers.generate` stop.

The generation config is read from what the backend holds: the PyTorch model's own
`generation_config`, or a `generation_config.json` in the tokenizer's folder or the folder above
it (an export or engine folder keeps its tokenizer in `tokenizer/`).
"""

from __future__ import annotations

import json
from pathlib import Path


def _ids(value) -> set[int]:
    if value is None:
        return set()
    if isinstance(value, (list, tuple)):
        return {int(v) for v in value if v is not None}
    return {int(value)}


def _config_file_ids(tokenizer) -> set[int]:
    name = getattr(tokenizer, "name_or_path", None)
    if not name or not Path(name).is_dir():
        return set()
    for folder in (Path(name), Path(name).parent):
        path = folder / "generation_config.json"
        if path.is_file():
            try:
                return _ids(json.loads(path.read_text()).get("eos_token_id"))
            except (OSError, ValueError, TypeError):
                return set()  # an unreadable config adds nothing: the tokenizer's EOS still stops
    return set()


def model_eos_ids(tokenizer, backend) -> frozenset[int]:
    ids = _ids(getattr(tokenizer, "eos_token_id", None))
    routed = getattr(backend, "routed", None)
    config = getattr(getattr(routed, "model", None), "generation_config", None)
    ids |= _ids(getattr(config, "eos_token_id", None)) if config is not None else _config_file_ids(tokenizer)
    return frozenset(ids)
