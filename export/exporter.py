"""Export a RoutedModel to ONNX: ONE graph (model.onnx + model.onnx.data) that serves prefill and
decode, the sidecar (export.json), the tokenizer and the routers next to it.

Route: `torch.export` of the RoutedModel's own forward with a past cache (wrapped to flat tensors
by `tokenskip.export.wrappers.StepGraph`), translated by `torch.onnx.export(dynamo=True)` without
its second trace (tokenskip.export.trace). The `tokenskip::topk_gather`
/ `tokenskip::scatter_tokens` torch custom ops stay single nodes through torch.export and become
`tokenskip::TopKGather` / `tokenskip::ScatterTokens` through a custom translation table.

Memory: the weights are written once, streamed tensor by tensor to the external data file by
`ONNXProgram.save(external_data=True)`; the post-pass (`onnx_ops.finalize`, dim names) edits the
graph loaded back with `load_external_data=False`, so no ModelProto ever holds the weights, and
the LLM is never copied (it is loaded in the export dtype). See docs/export.md.
"""

from __future__ import annotations

import contextlib
import gc
import io
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from tokenskip import attention
from tokenskip.config import RoutingConfig, save_routing
from tokenskip.errors import UserError
from tokenskip.fileio import write_json_atomic
from tokenskip.precision import DTYPES, dtype_name
from tokenskip.routed import RoutedModel, default_positions
from tokenskip.schedule import MIN_KEEP

from . import decode_branch, onnx_ops
from .trace import trace_to_onnx
from .sidecar import CACHE_LAYOUT, FORMAT, MODEL_FILE, ROUTING_DIR, SIDECAR, TOKENIZER_DIR, VERSION
from .wrappers import CACHE_FIELDS, StepGraph

OPSET_RANGE = (18, 21)  # torch.onnx's dynamo exporter emits at least opset 18; ORT 1.31+ runs 18..21
DEFAULT_OPSET = 18
DEFAULT_MAX_SEQ_LEN = 4096
MAX_BATCH = 4096

_ONNX_DTYPES = {1: "float32", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32", 9: "bool"}


# ------------------------------------------------------------------------------------ checks
def check_opset(opset: int) -> int:
    lo, hi = OPSET_RANGE
    if not isinstance(opset, int) or not lo <= opset <= hi:
        raise UserError(f"--opset {opset}: supported opsets are {lo}..{hi}")
    return opset


def model_dtype(routed: RoutedModel) -> str:
    """fp32 | fp16 | bf16: the dtype the LLM's weights are in (what the graph computes in)."""
    dt = next(routed.model.parameters()).dtype
    name = dtype_name(dt)
    if name not in DTYPES:
        raise UserError(f"the model's weights are {dt}: load it in one of {', '.join(DTYPES)}")
    return name


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
            dynamic_shapes, opset: int, optimize: bool, path: Path, timings: dict) -> None:
    """torch.export + ONNX translation (one trace: tokenskip.export.trace), then the weights
    streamed to `path`.data: the ONNXProgram (which references the model's own tensors) is dropped
    before anything else is loaded."""
    with _quiet():
        prog = trace_to_onnx(module, args, dynamic_shapes, input_names=input_names, output_names=output_names,
                             opset=opset, translation_table=onnx_ops.translation_table(), timings=timings)
    t0 = time.perf_counter()
    with _quiet():
        if optimize:
            prog.optimize()  # the whole onnxscript optimizer, rewrite rules included (minutes)
        simplify(prog.model)
    timings["simplify_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prog.save(str(path), external_data=True)  # <name>.onnx + <name>.onnx.data, one tensor at a time
    timings["save_s"] = time.perf_counter() - t0
    del prog
    gc.collect()


def simplify(model) -> None:
    """Constant folding, dead nodes, common subexpressions and debug metadata, in place on the ONNX IR (seconds;
    weights are never folded). TensorRT's parser needs it: it wants constant axes and shape
    inputs. Measured on smollm2-135m: 8550 -> 3701 nodes in about 3 s, where the onnxscript
    optimizer's rewrite rules take minutes for two more nodes (docs/export.md)."""
    from onnx_ir.passes import common
    from onnxscript.optimizer import fold_constants

    fold_constants(model)
    common.RemoveUnusedNodesPass()(model)
    common.CommonSubexpressionEliminationPass()(model)
    common.RemoveUnusedNodesPass()(model)
    common.ClearMetadataAndDocStringPass()(model)  # per-node fx stack traces: ~90% of the graph file


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


def _new_dim(routed: RoutedModel, li: int) -> str:
    """Rows layer li adds to its cache per call: the kept count under kv_policy=skip, else S."""
    return f"kept_{li}" if routed.layer_is_routed(li) and routed.kv_policy == "skip" else "seq"


def example_inputs(routed: RoutedModel, batch: int = 2, seq: int = 17) -> tuple:
    """Trace inputs: a left-padded batch continuing a past of distinct lengths per layer, all above
    S and so above every kept count (sizes that coincide can get unified or specialised by
    torch.export); the graph is valid for past length 0 and S = 1 too."""
    cfg = routed.model.config
    nkv = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    p = next(routed.model.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, :3] = 0  # left padding
    past = []
    for i in range(len(StepGraph(routed).layers)):
        t = seq + 3 + i
        past += [torch.randn(t, batch, nkv, head_dim, generator=g).to(p.dtype),
                 torch.randn(t, batch, nkv, head_dim, generator=g).to(p.dtype),
                 torch.arange(t).unsqueeze(1).expand(t, batch).contiguous(), torch.ones(t, batch, dtype=torch.bool)]
    positions = default_positions(mask.bool()) + seq + 3 + len(past) // 4
    return tuple(x.to(p.device) for x in (ids, mask, positions, *past))


def export_graph(routed: RoutedModel, opset: int, max_seq_len: int, optimize: bool, path: Path, timings: dict):
    """Trace StepGraph into `path` (+ .data) and return its graph proto (weights not loaded)."""
    import onnx
    from torch.export import Dim

    graph = StepGraph(routed).eval()
    batch, seq = Dim("batch", min=1, max=MAX_BATCH), Dim("seq", min=1, max=max_seq_len)
    shapes: list = [{0: batch, 1: seq}] * 3
    for li in graph.layers:
        past = Dim(f"past_{li}", min=0, max=max_seq_len)
        shapes += [{0: past, 1: batch}] * 4
    with torch.no_grad():
        _export(graph, example_inputs(routed), graph.input_names(), graph.output_names(),
                (shapes[0], shapes[1], shapes[2], tuple(shapes[3:])), opset, optimize, path, timings)
    t0 = time.perf_counter()
    proto = onnx.load(str(path), load_external_data=False)  # the graph only: weights stay on disk
    ins = {v.name: v for v in proto.graph.input}
    outs = {o.name: o for o in proto.graph.output}
    for name in ("input_ids", "attention_mask", "position_ids"):
        _set_dims(ins[name], {0: "batch", 1: "seq"})
    _set_dims(outs["logits"], {0: "batch"})
    for li in graph.layers:
        for f in CACHE_FIELDS:
            _set_dims(ins[f"past.{li}.{f}"], {0: f"past_{li}", 1: "batch"})
            _set_dims(outs[f"new.{li}.{f}"], {0: _new_dim(routed, li), 1: "batch"})
    for li in graph.routed_layers:
        _set_dims(outs[f"index.{li}"], {0: "batch", 1: f"kept_{li}"})
    proto = onnx_ops.finalize(proto, opset)
    onnx.save_model(proto, str(path))  # external data references kept as they are
    timings["post_s"] = time.perf_counter() - t0
    return proto


def _add_decode_branch(routed: RoutedModel, proto, opset: int, max_seq_len: int, path: Path, timings: dict):
    """If(S == 1, decode, routed) around the saved graph (tokenskip.export.decode_branch), the decode
    branch being the dense trace of the same model (its router off: what k = S = 1 computes). The
    dense trace goes to a scratch file whose weights are dropped: both traces name the parameters by
    their module paths, so its graph reads the routed file's weights."""
    import onnx

    scratch = path.with_name("decode-trace.onnx")
    saved = routed.router
    routed.router = None  # every block runs every token: layer_is_routed() is False, no score window
    try:
        # S = 1: one attention rectangle, the cache and the new row attended apart (no cache copy)
        with attention.graph_chunks(1), attention.graph_split_past():
            decode = export_graph(routed, opset, max_seq_len, False, scratch, {})
        t0 = time.perf_counter()
        proto = decode_branch.add_decode_branch(proto, decode, str(path.parent), always=True)
        onnx.save_model(proto, str(path))
    finally:
        routed.router = saved
        for f in (scratch, scratch.with_name(scratch.name + ".data")):
            f.unlink(missing_ok=True)
    timings["decode_merge_s"] = time.perf_counter() - t0
    return proto


def _check(path: Path) -> None:
    import onnx

    onnx_ops.register_schemas()
    onnx.checker.check_model(str(path), full_check=True)


# ---------------------------------------------------------------------------------------- API
def export_model(loaded, routed: RoutedModel, cfg: RoutingConfig, out_dir: str | os.PathLike, *,
                 opset: int = DEFAULT_OPSET, dtype: str | None = None, max_seq_len: int = DEFAULT_MAX_SEQ_LEN,
                 force: bool = False, check: bool = True, optimize: bool = False, log=None,
                 decode_at_dense_cost: bool = True) -> dict:
    """Export `routed` (built by tokenskip.config.build_routed from `loaded.model`) into out_dir.

    Writes model.onnx (+ .data), export.json, tokenizer/ and routing/ into a temporary folder next
    to out_dir and renames it into place at the end: an interrupted export leaves no half-written
    out_dir. Returns the sidecar dict (with "timings": seconds per stage).

    The graph computes in the dtype the LLM was loaded in (`load_model(name, dtype=...)`; the
    router stays fp32); `dtype`, when given, must be that dtype (the model is never copied).
    The graph is always simplified (constant folding, dead code, CSE: seconds); `optimize` adds the
    whole onnxscript optimizer (its rewrite rules take minutes and changed nothing measurable in
    ONNX Runtime; docs/export.md). `decode_at_dense_cost` (default True): a call with S = 1 takes
    the dense trace of the same model: no router, score window, custom op or per-token gather
    (docs/export.md, "Decode path");
    False exports the single traced path (for before/after comparisons).
    """
    log = log or (lambda msg: None)
    out_dir = Path(out_dir)
    check_opset(opset)
    exported = model_dtype(routed)
    if dtype is not None and dtype != exported:
        raise UserError(f"--dtype {dtype}: the model was loaded in {exported}; load it with "
                        f"load_model(name, dtype={dtype!r}) (the exporter never copies the weights)")
    if not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise UserError(f"--max-seq-len {max_seq_len}: must be an integer >= 2")
    check_out_dir(out_dir, force)
    check_exportable(routed)
    routed.eval()

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.export-", dir=out_dir.parent))
    timings: dict = {}
    try:
        t0 = time.perf_counter()
        log(f"exporting the graph ({exported}; torch.export + ONNX translation, weights streamed to disk)...")
        proto = export_graph(routed, opset, max_seq_len, optimize, tmp / MODEL_FILE, timings)
        # a dense export gets the If too: its decode branch attends to the cache without copying it
        # (attention.graph_attend_past) and its prefill may run causal chunks, as a routed export's
        if decode_at_dense_cost:
            t1 = time.perf_counter()
            log("tracing the decode branch (the same model, router off)...")
            proto = _add_decode_branch(routed, proto, opset, max_seq_len, tmp / MODEL_FILE, timings)
            timings["decode_branch_s"] = time.perf_counter() - t1
        log(f"  {MODEL_FILE}: {time.perf_counter() - t0:.0f} s")
        if check:
            log("onnx.checker full_check...")
            t1 = time.perf_counter()
            _check(tmp / MODEL_FILE)
            timings["check_s"] = time.perf_counter() - t1
        loaded.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        gen_config = getattr(loaded.model, "generation_config", None)
        if gen_config is not None:  # its eos_token_id list (end-of-turn ids) stops ORT/TRT serving too
            gen_config.save_pretrained(str(tmp / TOKENIZER_DIR))  # (deploy/runtime/stop_ids.py reads it)
        save_routing(tmp / ROUTING_DIR, cfg, routed.router)
        sidecar = build_sidecar(loaded.name, routed, cfg, exported, opset, max_seq_len, proto)
        del proto
        timings["total_s"] = time.perf_counter() - t0
        sidecar["optimized"] = optimize
        sidecar["timings"] = {k: v if isinstance(v, bool) else round(v, 2) for k, v in timings.items()}
        write_json_atomic(tmp / SIDECAR, sidecar)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out_dir} in {time.perf_counter() - t0:.0f} s")
    return sidecar


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
                  max_seq_len: int, proto) -> dict:
    layers = []
    for li in range(len(routed.layers)):
        entry = {"layer": li, "routed": bool(routed.layer_is_routed(li)), "sparsity": routed.schedule.sparsity[li]}
        if entry["routed"]:
            num, den = routed.schedule.keep_fraction(li)
            entry.update(keep_num=num, keep_den=den, min_keep=MIN_KEEP)
        else:
            entry.update(keep_num=1, keep_den=1, min_keep=MIN_KEEP)
        entry["new_len"] = _new_dim(routed, li)
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
        # causal query chunks traced into prefill attention (--attention-chunks); 1: one rectangle,
        # which the ONNX Runtime backend may chunk at load (deploy/runtime/ort_chunks.py)
        "attention_chunks": attention.GRAPH_CAUSAL_CHUNKS,
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
        "graphs": {"model": _graph_spec(MODEL_FILE, proto)},
        "cache": {"layout": CACHE_LAYOUT, "fields": list(CACHE_FIELDS),
                  "layers": [l["layer"] for l in layers if l["layer"] not in routed.removed_layers]},
        "layers": layers,
        "tokenizer": TOKENIZER_DIR,
        "routers": ROUTING_DIR,
    }
