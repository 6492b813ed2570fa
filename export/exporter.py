"""Export a RoutedModel to ONNX: the prefill graph (model.onnx), the decode graph (decode.onnx),
and the sidecar (export.json) with the tokenizer and the routers next to them.

Route: `torch.onnx.export(dynamo=True)` of the RoutedModel's own forward / decode_step (wrapped
to flat tensors by `tokenskip.export.wrappers`). The `tokenskip::topk_gather` /
`tokenskip::scatter_tokens` torch custom ops stay single nodes through torch.export and become
`tokenskip::TopKGather` / `tokenskip::ScatterTokens` through a custom translation table; a
post-pass (`onnx_ops.finalize`) adds `plugin_namespace="tokenskip"` and the model-local function
bodies. See docs/export.md.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tokenskip.config import RoutingConfig, save_routing
from tokenskip.errors import UserError
from tokenskip.fileio import write_json_atomic
from tokenskip.routed import RoutedModel
from tokenskip.schedule import MIN_KEEP

from . import onnx_ops
from .sidecar import DECODE_FILE, FORMAT, PREFILL_FILE, ROUTING_DIR, SIDECAR, TOKENIZER_DIR, VERSION, read_export
from .wrappers import CACHE_FIELDS, DecodeGraph, PrefillGraph

OPSET_RANGE = (18, 21)  # torch.onnx's dynamo exporter emits at least opset 18; ORT 1.31+ runs 18..21
DEFAULT_OPSET = 18
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_MAX_SEQ_LEN = 4096

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


# ------------------------------------------------------------------------------------ checks
def check_opset(opset: int) -> int:
    lo, hi = OPSET_RANGE
    if not isinstance(opset, int) or not lo <= opset <= hi:
        raise UserError(f"--opset {opset}: supported opsets are {lo}..{hi}")
    return opset


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose from {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_out_dir(out_dir: Path, force: bool) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise UserError(f"--out {out_dir}: exists and is not a folder")
        if any(out_dir.iterdir()) and not force:
            raise UserError(f"--out {out_dir}: folder exists and is not empty (pass --force to replace it)")


def check_exportable(routed: RoutedModel) -> None:
    from tokenskip.routers import RandomRouter

    if isinstance(routed.router, RandomRouter):
        raise UserError("--router random is a training/evaluation baseline and cannot be exported "
                        "(its scores come from a host-side RNG); export static, learned or dense")
    if routed.removed_layers:
        raise UserError("a layer-removal baseline cannot be exported (export static, learned or dense)")


# --------------------------------------------------------------------------------- tracing
@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress lines and many warnings; keep the CLI output ours."""
    buf_out, buf_err = io.StringIO(), io.StringIO()
    import logging

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._export", "torch.export", "torch.fx",
                                              "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
                                              "torch.onnx._internal.exporter._registration")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
            warnings.simplefilter("ignore")
            yield
    except Exception:
        # surface what the exporter said when it fails
        tail = (buf_out.getvalue() + buf_err.getvalue())[-4000:]
        if tail.strip():
            print(tail, file=__import__("sys").stderr)
        raise
    finally:
        for lg, lv in zip(loggers, levels):
            lg.setLevel(lv)


def _export(module: torch.nn.Module, args: tuple, input_names: list[str], output_names: list[str],
            dynamic_shapes, opset: int, optimize: bool = True):
    with _quiet():
        prog = torch.onnx.export(module, args, dynamo=True, input_names=input_names, output_names=output_names,
                                 dynamic_shapes=dynamic_shapes, custom_translation_table=onnx_ops.translation_table(),
                                 opset_version=opset, external_data=True, optimize=optimize, verbose=False)
    return prog.model_proto


def _set_dims(value_info, dims: dict[int, str]) -> None:
    shape = value_info.type.tensor_type.shape
    for axis, name in dims.items():
        d = shape.dim[axis]
        d.Clear()
        d.dim_param = name


def _io_spec(values) -> dict:
    spec = {}
    for v in values:
        tt = v.type.tensor_type
        shape = [d.dim_param if d.dim_param else int(d.dim_value) for d in tt.shape.dim]
        spec[v.name] = {"dtype": _ONNX_DTYPES.get(tt.elem_type, str(tt.elem_type)), "shape": shape}
    return spec


def _graph_spec(file: str, proto) -> dict:
    """File names, inputs/outputs by name (JSON objects get sorted on disk, so the graph's own
    order is kept in input_order/output_order)."""
    return {"file": file, "data": file + ".data",
            "inputs": _io_spec(proto.graph.input), "outputs": _io_spec(proto.graph.output),
            "input_order": [v.name for v in proto.graph.input], "output_order": [v.name for v in proto.graph.output]}


def _kv_dim(routed: RoutedModel, li: int) -> str:
    """Prefill cache length of layer li: the kept count under kv_policy=skip, else the full seq."""
    return f"kept_{li}" if routed.layer_is_routed(li) and routed.kv_policy == "skip" else "seq"


def _example_batch(vocab: int, batch: int = 2, seq: int = 17):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    return ids, mask


def export_prefill(routed: RoutedModel, opset: int, max_seq_len: int, optimize: bool = True):
    from torch.export import Dim

    graph = PrefillGraph(routed).eval()
    vocab = routed.model.config.vocab_size
    ids, mask = _example_batch(vocab)
    batch, seq = Dim("batch", min=1, max=4096), Dim("seq", min=2, max=max_seq_len)
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
    names_out = graph.output_names()
    proto = _export(graph, (ids, mask), ["input_ids", "attention_mask"], names_out, shapes, opset, optimize)
    outs = {o.name: o for o in proto.graph.output}
    for v in proto.graph.input:
        _set_dims(v, {0: "batch", 1: "seq"})
    _set_dims(outs["logits"], {0: "batch"})
    for li in graph.layers:
        dim = _kv_dim(routed, li)
        for f in CACHE_FIELDS:
            _set_dims(outs[f"present.{li}.{f}"], {0: "batch", 2 if f in ("key", "value") else 1: dim})
    for li in graph.routed_layers:
        _set_dims(outs[f"index.{li}"], {0: "batch", 1: f"kept_{li}"})
    return onnx_ops.finalize(proto, opset), graph


def export_decode(routed: RoutedModel, opset: int, max_seq_len: int, dtype: torch.dtype, optimize: bool = True):
    from torch.export import Dim

    graph = DecodeGraph(routed).eval()
    cfg = routed.model.config
    nkv = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    bsz = 2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (bsz, 1), generator=g)
    past, shapes = [], [{0: Dim("batch", min=1, max=4096)}, {0: Dim("batch", min=1, max=4096)}]
    batch = shapes[0][0]
    shapes[1] = {0: batch}
    lengths = {}
    for i, li in enumerate(graph.layers):
        t = 9 + i  # distinct example lengths, so no two layers' past dims get unified
        lengths[li] = t
        dim = Dim(f"past_{li}", min=1, max=max_seq_len)
        past += [torch.randn(bsz, nkv, t, head_dim, generator=g).to(dtype),
                 torch.randn(bsz, nkv, t, head_dim, generator=g).to(dtype),
                 torch.arange(t).expand(bsz, t).contiguous(), torch.ones(bsz, t, dtype=torch.bool)]
        shapes += [{0: batch, 2: dim}, {0: batch, 2: dim}, {0: batch, 1: dim}, {0: batch, 1: dim}]
    pos = torch.full((bsz, 1), max(lengths.values()), dtype=torch.long)
    shapes = (shapes[0], shapes[1], tuple(shapes[2:]))  # forward(input_ids, position_ids, *past)
    proto = _export(graph, (ids, pos, *past), graph.input_names(), graph.output_names(), shapes, opset,
                    optimize)
    ins = {v.name: v for v in proto.graph.input}
    outs = {o.name: o for o in proto.graph.output}
    _set_dims(ins["input_ids"], {0: "batch"})
    _set_dims(ins["position_ids"], {0: "batch"})
    _set_dims(outs["logits"], {0: "batch"})
    for li in graph.layers:
        for f in CACHE_FIELDS:
            axis = 2 if f in ("key", "value") else 1
            _set_dims(ins[f"past.{li}.{f}"], {0: "batch", axis: f"past_{li}"})
            _set_dims(outs[f"present.{li}.{f}"], {0: "batch", axis: f"present_{li}"})
    return onnx_ops.finalize(proto, opset), graph


def _save(proto, path: Path) -> None:
    import onnx

    # weights always go to a side file: graphs stay small to inspect, and > 2 GB models work
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024, convert_attribute=False)


def _check(path: Path) -> None:
    import onnx

    onnx_ops.register_schemas()
    onnx.checker.check_model(str(path), full_check=True)


# ---------------------------------------------------------------------------------------- API
def export_model(loaded, routed: RoutedModel, cfg: RoutingConfig, out_dir: str | os.PathLike, *,
                 opset: int = DEFAULT_OPSET, dtype: str = "fp32", max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                 force: bool = False, check: bool = True, optimize: bool = True,
                 reuse_decode: str | os.PathLike | None = None, log=None) -> dict:
    """Export `routed` (built by tokenskip.config.build_routed from `loaded.model`) into out_dir.

    Writes model.onnx (+ .data), decode.onnx (+ .data), export.json, tokenizer/ and routing/ into a
    temporary folder next to out_dir and renames it into place at the end: an interrupted export
    leaves no half-written out_dir. Returns the sidecar dict.

    The decode graph does not depend on the router, schedule or kv_policy (a generated token runs
    every block against each layer's cache), only on the model, dtype, opset and max_seq_len:
    `reuse_decode=DIR` copies it from an earlier export of the same model instead of re-tracing it.
    `optimize` runs the onnxscript optimizer on both graphs (constant folding, dead code removal).
    """
    log = log or (lambda msg: None)
    out_dir = Path(out_dir)
    check_opset(opset)
    torch_dtype = check_dtype(dtype)
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise UserError(f"--max-seq-len {max_seq_len}: must be an integer >= 2")
    check_out_dir(out_dir, force)
    check_exportable(routed)
    if torch_dtype != torch.float32:
        # the LLM in fp16; the router (scores, features, attention table) stays fp32 as in PyTorch
        model16 = copy.deepcopy(routed.model).to(torch_dtype)
        routed = RoutedModel(model16, routed.schedule, routed.router, kv_policy=routed.kv_policy,
                             score_window=routed.score_window, removed_layers=routed.removed_layers)
    routed.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    try:
        t0 = time.perf_counter()
        log("exporting the prefill graph (torch.export + ONNX translation)...")
        with torch.no_grad():
            prefill_proto, prefill = export_prefill(routed, opset, max_seq_len, optimize)
        _save(prefill_proto, tmp / PREFILL_FILE)
        log(f"  {PREFILL_FILE}: {time.perf_counter() - t0:.0f} s")
        t1 = time.perf_counter()
        if reuse_decode is not None:
            decode_proto = _reuse_decode(Path(reuse_decode), tmp, loaded.name, dtype, opset, max_seq_len)
            log(f"  {DECODE_FILE}: reused from {reuse_decode}")
        else:
            log("exporting the decode graph...")
            with torch.no_grad():
                decode_proto, _ = export_decode(routed, opset, max_seq_len, torch_dtype, optimize)
            _save(decode_proto, tmp / DECODE_FILE)
            log(f"  {DECODE_FILE}: {time.perf_counter() - t1:.0f} s")
        if check:
            log("onnx.checker full_check...")
            _check(tmp / PREFILL_FILE)
            _check(tmp / DECODE_FILE)
        loaded.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        save_routing(tmp / ROUTING_DIR, cfg, routed.router)
        sidecar = build_sidecar(loaded.name, routed, cfg, dtype, opset, max_seq_len, prefill_proto, decode_proto)
        sidecar["optimized"] = optimize
        write_json_atomic(tmp / SIDECAR, sidecar)
        del prefill_proto, decode_proto
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir} in {time.perf_counter() - t0:.0f} s")
    return sidecar


def _reuse_decode(src: Path, tmp: Path, model_name: str, dtype: str, opset: int, max_seq_len: int):
    """Copy decode.onnx (+ data) from an export of the same model, dtype, opset and max_seq_len."""
    import onnx

    side = read_export(src, "--reuse-decode")
    want = {"model": model_name, "dtype": dtype, "opset": opset, "max_seq_len": max_seq_len}
    for key, value in want.items():
        if side.get(key) != value:
            raise UserError(f"--reuse-decode {src}: exported with {key}={side.get(key)!r}, this export has {value!r}")
    info = side["graphs"]["decode"]
    shutil.copy2(src / info["file"], tmp / DECODE_FILE)
    if (src / info.get("data", "")).is_file():
        shutil.copy2(src / info["data"], tmp / (DECODE_FILE + ".data"))
    return onnx.load(str(tmp / DECODE_FILE), load_external_data=False)


def _fix_modes(root: Path) -> None:
    """mkdtemp makes a 0700 folder; give the export the permissions of a normal mkdir (umask)."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, dirnames, filenames in os.walk(root):
        os.chmod(dirpath, 0o777 & ~umask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~umask)


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    _fix_modes(tmp)
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "x")
    os.replace(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_sidecar(model_name: str, routed: RoutedModel, cfg: RoutingConfig, dtype: str, opset: int,
                  max_seq_len: int, prefill_proto, decode_proto) -> dict:
    layers = []
    for li in range(len(routed.layers)):
        entry = {"layer": li, "routed": bool(routed.layer_is_routed(li)), "sparsity": routed.schedule.sparsity[li]}
        if entry["routed"]:
            num, den = routed.schedule.keep_fraction(li)
            entry.update(keep_num=num, keep_den=den, min_keep=MIN_KEEP)
        else:
            entry.update(keep_num=1, keep_den=1, min_keep=MIN_KEEP)
        entry["prefill_kv_len"] = _kv_dim(routed, li)
        layers.append(entry)
    c = routed.model.config
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": model_name,
        "routing": cfg.to_json(),
        "router": cfg.router,
        "kv_policy": routed.kv_policy,
        "score_window": routed.score_window,
        "dtype": dtype,
        "opset": opset,
        "ir_version": onnx_ops.IR_VERSION,
        "max_seq_len": max_seq_len,
        "custom_ops": {"domain": onnx_ops.DOMAIN, "version": onnx_ops.DOMAIN_VERSION,
                       "plugin_namespace": onnx_ops.PLUGIN_NAMESPACE,
                       "ops": [onnx_ops.TOPK_GATHER, onnx_ops.SCATTER_TOKENS] if any(l["routed"] for l in layers)
                       else []},
        "config": {"num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size, "vocab_size": c.vocab_size,
                   "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                   "head_dim": getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
                   "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id},
        "graphs": {
            "prefill": _graph_spec(PREFILL_FILE, prefill_proto),
            "decode": _graph_spec(DECODE_FILE, decode_proto),
        },
        "layers": layers,
        "tokenizer": TOKENIZER_DIR,
        "routers": ROUTING_DIR,
    }
