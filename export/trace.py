"""One trace from the module to ONNX: `torch.export`, then torch.onnx's translation of that program.

Why this module exists: profiled on smollm2-135m (docs/export.md "Export speed"), the export was
almost all PyTorch tracing with symbolic shapes, in two traces. `torch.onnx.export(module)` runs
`torch.export`, then ALWAYS re-traces the program (`run_decompositions` with its ONNX table, under
`backed_size_oblivious`) to lower the few ops without an ONNX translation. Three things cut it:

1. The fake-tensor dispatch cache is turned off while tracing. With 30 distinct past lengths and the
   kept counts `min(S, max(2, ceil(n*S/d)))` as symbolic sizes, building and checking each cache
   entry (sympy stride and contiguity proofs) cost more than the dispatch it saves: torch.export of
   a 12-layer model took 9.8 s without the cache and 15.7 s with it.
2. The retrace is skipped when it would change nothing: our traced program uses only ops that
   torch.onnx translates directly, plus four spellings with a one-to-one equivalent
   (`__and__`/`__or__` -> `bitwise_and`/`bitwise_or`, `to.dtype`/`to.device` -> `_to_copy` with the
   traced output dtype) and metadata asserts torch.onnx deletes anyway. Those are rewritten in
   place on the FX graph. Any other op (a model with an op that needs a real decomposition) takes
   torch.onnx's own retrace, as before. The ONNX graphs from both routes have the same nodes up to
   shape arithmetic (tested: same outputs in ONNX Runtime, tests/test_export.py).
3. torch.onnx's type-promotion pass (explicit casts where an op mixes dtypes) re-executes every
   node on fake tensors only to learn values the trace already recorded in `node.meta["val"]`;
   here it reads them from there and re-executes only the nodes it changes (a learned-router
   graph: 34 s of a 48 s translation, profiled).

(2) and (3) reach into `torch.onnx._internal` (the decomposition step has no public switch): when that
module moves, `fast_decompositions` finds nothing to patch, and the export runs the public route
unchanged, recorded as `retraced` in the export's timings.
"""

from __future__ import annotations

import contextlib
import time

import torch

_aten = torch.ops.aten
# ops with no ONNX translation of their own whose exact equivalent has one
_RENAME = {_aten.__and__.Tensor: _aten.bitwise_and.Tensor, _aten.__or__.Tensor: _aten.bitwise_or.Tensor}
_CASTS = {_aten.to.dtype, _aten.to.device, _aten.to.dtype_layout}
# removed by torch.onnx after the decomposition step (its remove_assertion_nodes)
_ASSERTS = {_aten._assert_tensor_metadata.default, _aten._assert_scalar.default,
            _aten.sym_constrain_range_for_size.default, _aten._assert_async.default, _aten._assert_async.msg}


def lower_in_place(graph_module: torch.fx.GraphModule, translated: set) -> bool:
    """Rewrite the few untranslated spellings in place; False (graph untouched) if any other op
    lacks a translation, or a higher-order op is present: then the program needs the real retrace."""
    todo = []
    for node in graph_module.graph.nodes:
        if node.op != "call_function":
            continue
        target = node.target
        if isinstance(target, torch._ops.HigherOrderOperator):
            return False
        if not isinstance(target, torch._ops.OpOverload) or target in translated or target in _ASSERTS:
            continue
        if target in _RENAME or (target in _CASTS and isinstance(node.meta.get("val"), torch.Tensor)):
            todo.append(node)
            continue
        return False
    for node in todo:
        if node.target in _RENAME:
            node.target = _RENAME[node.target]
        else:  # x.to(...) -> _to_copy(x, dtype=<the traced output dtype>); devices mean nothing in ONNX
            node.target = _aten._to_copy.default
            node.args, node.kwargs = (node.args[0],), {"dtype": node.meta["val"].dtype}
    graph_module.recompile()
    return True


def _recorded_promotion():
    """torch.onnx's InsertTypePromotion with an interpreter that takes each node's value from
    `node.meta["val"]` instead of re-executing it; a node whose inputs it casts is re-run (by the
    pass itself), so its meta and everything downstream stay exact."""
    from torch.onnx._internal.fx import passes
    from torch.onnx._internal.fx.passes import type_promotion as tp

    class RecordedValues(tp._TypePromotionInterpreter):
        def run_node(self, n):
            val = n.meta.get("val")
            if n.op != "call_function" or val is None:
                return super().run_node(n)
            with self._set_current_node(n):
                if rule := tp.get_type_promotion_rule(n, self.type_promotion_table):
                    self._maybe_promote_node(n, rule)  # re-runs n (and sets its meta) if it changed it
            return n.meta["val"]

    def insert_type_promotion_nodes(graph_module: torch.fx.GraphModule) -> None:
        for module in graph_module.modules():
            transform = passes.InsertTypePromotion(module)
            transform.interpreter = RecordedValues(module, tp.TypePromotionTable())
            transform.run()

    return insert_type_promotion_nodes


@contextlib.contextmanager
def fast_decompositions(record: dict):
    """While active, torch.onnx's decomposition step lowers in place instead of re-tracing when it
    can, and its type promotion reads the recorded values; record["retraced"] says which route the
    export took."""
    try:
        from torch.onnx._internal.exporter import _decomp, _fx_passes
        original = _fx_passes.decompose_with_registry
        original_promotion = _fx_passes.insert_type_promotion_nodes
        implemented = _decomp.get_onnx_implemented_overloads
        promotion = _recorded_promotion()
    except (ImportError, AttributeError):  # torch moved it: the public route, unchanged
        record["retraced"] = True
        yield
        return

    def decompose(exported_program, registry):
        if lower_in_place(exported_program.graph_module, set(implemented(registry))):
            record["retraced"] = False
            return exported_program
        record["retraced"] = True
        return original(exported_program, registry)

    _fx_passes.decompose_with_registry = decompose
    _fx_passes.insert_type_promotion_nodes = promotion
    try:
        yield
    finally:
        _fx_passes.decompose_with_registry = original
        _fx_passes.insert_type_promotion_nodes = original_promotion


def trace_to_onnx(module: torch.nn.Module, args: tuple, dynamic_shapes, *, input_names: list[str],
                  output_names: list[str], opset: int, translation_table: dict, timings: dict):
    """torch.export (non-strict, with the settings of torch.onnx's first capture strategy), then
    the ONNX translation; returns the ONNXProgram. timings gets export_s, translate_s, retraced."""
    with torch._dynamo.config.patch(fake_tensor_cache_enabled=False):
        t0 = time.perf_counter()
        with torch.fx.experimental._config.patch(backed_size_oblivious=True):
            # guards the symbolic reasoning cannot prove (min(window, S) <= S) become runtime asserts,
            # which the translation drops, as torch.onnx's own capture does by default
            program = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False,
                                          prefer_deferred_runtime_asserts_over_guards=True)
        timings["export_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        with fast_decompositions(timings):
            onnx_program = torch.onnx.export(program, args, dynamo=True, input_names=input_names,
                                             output_names=output_names, custom_translation_table=translation_table,
                                             opset_version=opset, optimize=False, verbose=False)
        timings["translate_s"] = time.perf_counter() - t0
    return onnx_program
