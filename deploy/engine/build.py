"""Build TensorRT engines from a `tokenskip export` folder: one engine for the export's one graph.

For each graph of the export: parse the ONNX file (external data resolved next to it) with our
plugin library registered, so every `tokenskip::TopKGather` / `ScatterTokens` node becomes a
plugin layer (no TopK K <= 3840 cap), or, with plugins off, from the model-local function bodies
the parser inlines when no creator is registered. The export's one graph becomes ONE engine for
prefill and decode, with a prefill and a decode optimisation profile (or, --profiles shared, one
for both; plan.py has the shapes and the measured trade-off). Engines are cached in `cache_dir()/engines/<key>/` keyed by the ONNX
hash (with its external data) and every setting that changes the engine; files are written
atomically, so a failed build leaves no partial engine. Each engine gets a JSON build report:
layers by type, plugin layers, whether any tokenskip node fell back to its function body, build
time, engine size.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

from tokenskip.errors import UserError
from tokenskip.export.sidecar import read_export
from tokenskip.fileio import atomic_path, cache_dir, write_bytes_atomic, write_json_atomic

from . import flavour
from .plan import (BuildSettings, build_targets, parse_compute_capabilities,  # noqa: F401 (re-exported)
                          phase_profiles, profile_shapes, set_targets)

ENGINE_SIDECAR = "engine.json"  # read by deploy/runtime/trt_backend.py; written last: the folder's commit marker
ENGINE_FORMAT, ENGINE_VERSION = "tokenskip-engines", 1
TOKENSKIP_DOMAIN = "tokenskip"
TOKENSKIP_OPS = ("TopKGather", "ScatterTokens")
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


# ------------------------------------------------------------------------------------ the export
def read_export_graphs(export_dir: str | os.PathLike) -> tuple[dict, dict[str, Path]]:
    """(sidecar, {graph name: onnx path}) of an export folder, through the one sidecar reader."""
    side = read_export(export_dir, "EXPORT_DIR", required=())
    if not side["graphs"]:
        raise UserError(f"{Path(export_dir) / 'export.json'}: 'graphs' is empty (re-export with `tokenskip export`)")
    return side, {name: Path(export_dir) / entry["file"] for name, entry in side["graphs"].items()}


def _copy_folder(src: Path, dst: Path) -> None:
    """Copy a folder into place whole: a temporary copy renamed over dst."""
    tmp = dst.parent / f".{dst.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _onnx_summary(path: Path) -> tuple[str, dict[str, int], dict[str, list]]:
    """(sha256 of the file and its external data, tokenskip node counts, graph input dims)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf DecodeError and friends
        raise UserError(f"{path} is not a readable ONNX file: {exc}") from None
    data_files: set[str] = set()
    counts: collections.Counter = collections.Counter()

    def walk(graph) -> None:
        for t in graph.initializer:
            for kv in t.external_data:
                if kv.key == "location":
                    data_files.add(kv.value)
        for node in graph.node:
            if node.domain == TOKENSKIP_DOMAIN:
                counts[node.op_type] += 1
            for attr in node.attribute:
                if attr.g.ByteSize():
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(model.graph)
    h = hashlib.sha256()
    for f in [path] + sorted(path.parent / name for name in data_files):
        if not f.is_file():
            raise UserError(f"{f} is missing (external data of {path.name})")
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                h.update(block)
    inits = {t.name for t in model.graph.initializer}
    dims = {v.name: [d.dim_param or (d.dim_value if d.HasField("dim_value") else "?") for d in
                     v.type.tensor_type.shape.dim] for v in model.graph.input if v.name not in inits}
    return h.hexdigest(), dict(counts), dims


# ------------------------------------------------------------------------------------ building
class _Logger:
    """TensorRT logger that keeps warnings and errors for the report and error messages."""

    def __new__(cls, trt):
        class Impl(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.messages: list[tuple[str, str]] = []

            def log(self, severity, msg) -> None:
                if int(severity) <= int(trt.ILogger.WARNING):
                    self.messages.append((str(severity).rsplit(".", 1)[-1], str(msg)))

            def errors(self) -> list[str]:
                return [m for sev, m in self.messages if sev in ("ERROR", "INTERNAL_ERROR")]

        return Impl()


def _progress_monitor(trt, log: Callable[[str], None], label: str):
    """Prints the top two levels of TensorRT's build phases (the slow part of a build)."""
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.depth: dict[str, int] = {}
            self.t0 = time.monotonic()

        def phase_start(self, phase_name, parent_phase, num_steps) -> None:
            depth = 0 if parent_phase is None else self.depth.get(parent_phase, 0) + 1
            self.depth[phase_name] = depth
            if depth <= 1:
                log(f"[{label}] {'  ' * depth}{phase_name} ({time.monotonic() - self.t0:.1f} s)")

        def step_complete(self, phase_name, step) -> bool:
            return True  # never cancel

        def phase_finish(self, phase_name) -> None:
            pass

    return Monitor()


def _network_summary(backend, network) -> dict:
    by_type: collections.Counter = collections.Counter()
    plugins = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        by_type[str(layer.type).rsplit(".", 1)[-1]] += 1
        ident = backend.plugin_of(layer)
        if ident is not None:
            plugins.append({"name": layer.name, "plugin": ident[0], "namespace": ident[1]})
    return {"layers": network.num_layers, "layers_by_type": dict(sorted(by_type.items())), "plugin_layers": plugins}


def _build_one(backend, graph: str, onnx_path: Path, inputs: dict[str, list], s: BuildSettings, lib: Path | None,
               log: Callable[[str], None], targets: list[str] | None = None) -> tuple[bytes, dict]:
    trt = backend.trt
    logger = _Logger(trt)
    builder = trt.Builder(logger)
    weak = s.precision is not None and not backend.always_strongly_typed
    flags = 0
    if not backend.always_strongly_typed and not weak:
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    log(f"[{graph}] parsing {onnx_path.name}")
    t0 = time.monotonic()
    import onnx

    from tokenskip.export.decode_branch import routed_only

    # TensorRT-RTX cannot compile plugin layers inside the export's If(S == 1, decode, routed): parse the routed path
    routed = routed_only(onnx.load(str(onnx_path), load_external_data=False))
    if not (parser.parse(routed.SerializeToString(), str(onnx_path)) if routed is not None
            else parser.parse_from_file(str(onnx_path))):
        errs = [parser.get_error(i).desc() for i in range(parser.num_errors)] or logger.errors() or ["unknown error"]
        raise UserError(f"{onnx_path}: TensorRT ({backend.name}) cannot parse it: {errs[0]}")
    summary = _network_summary(backend, network)
    net_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    profiles = phase_profiles({t.name: inputs.get(t.name, [d if d >= 0 else "?" for d in t.shape]) for t in net_inputs},
                              s)
    config = builder.create_builder_config()
    set_targets(backend, config, targets)
    if weak:
        config.set_flag(trt.BuilderFlag.FP16 if s.precision == "fp16" else trt.BuilderFlag.BF16)
    for i, (phase, shapes) in enumerate(profiles.items()):  # profile index = position (the runtime selects by name)
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        index = config.add_optimization_profile(profile)  # -1: TensorRT rejected the shapes
        if index != i:
            raise UserError(f"TensorRT ({backend.name}) rejected the {phase} optimisation profile of {onnx_path} "
                            f"(add_optimization_profile returned {index}) with shapes {json.dumps(shapes)}: check "
                            "--min/--opt/--max-seq-len and --opt/--max-batch")
    timing = None
    if s.timing_cache and not backend.is_rtx:
        tc = Path(s.timing_cache)
        timing = config.create_timing_cache(tc.read_bytes() if tc.is_file() else b"")
        config.set_timing_cache(timing, False)
    if lib is not None and s.embed_plugins:
        config.plugins_to_serialize = [str(lib)]
    monitor = _progress_monitor(trt, log, graph)
    if monitor is not None:
        config.progress_monitor = monitor
    lo_b, hi_b = 1, s.max_batch
    log(f"[{graph}] building engine ({backend.name} {backend.version}; profiles {', '.join(profiles)}; batch "
        f"{lo_b}..{hi_b}, seq {s.min_seq_len}..{s.opt_seq_len}..{s.max_seq_len}); this can take minutes")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errs = logger.errors() or ["no error message"]
        if backend.is_rtx and not s.plugins and "is_const" in errs[-1] and s.min_seq_len != s.max_seq_len:
            # TensorRT-RTX 1.7's Myelin compiler rejects the function-body graph (TopK with k derived from
            # a dynamic S) unless S is fixed; the plugin build has no such limit (docs/plugins.md)
            raise UserError(f"TensorRT-RTX cannot build the {graph} graph of {onnx_path.parent} from the ONNX function "
                            f"bodies with a dynamic sequence length (Myelin CHECK(is_const()) failed): build a fixed "
                            f"one, e.g. --no-plugins --min-seq-len {s.opt_seq_len} --opt-seq-len {s.opt_seq_len} "
                            f"--max-seq-len {s.opt_seq_len}, or drop --no-plugins")
        raise UserError(f"TensorRT ({backend.name}) failed to build the {graph} engine from {onnx_path}: {errs[-1]}")
    data = bytes(serialized)
    if timing is not None:
        write_bytes_atomic(s.timing_cache, bytes(config.get_timing_cache().serialize()))
    report = {
        "graph": graph, "backend": backend.name, "tensorrt_version": backend.version,
        "precision": s.precision or "as exported", "profiles": profiles, "compute_capabilities": targets,
        "build_seconds": round(time.monotonic() - t0, 2), "engine_bytes": len(data),
        **summary,
        "warnings": [m for sev, m in logger.messages if sev == "WARNING"][:20],
    }
    return data, report


def _with_fallback(report: dict, counts: dict[str, int], plugins: bool) -> dict:
    """Compare the tokenskip nodes of the ONNX file with the plugin layers of the network."""
    got = collections.Counter(p["plugin"] for p in report["plugin_layers"] if p["namespace"] == TOKENSKIP_DOMAIN)
    fallback = {op: max(0, counts.get(op, 0) - got.get(op, 0)) for op in TOKENSKIP_OPS}
    report.update(tokenskip_nodes={op: counts.get(op, 0) for op in TOKENSKIP_OPS}, fallback=fallback,
                  fell_back=any(fallback.values()), plugins=plugins)
    return report


def _place(src: Path, dst: Path) -> None:
    """Put a cached file at dst atomically (hard link when possible, else copy)."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _plugin_library(s: BuildSettings, log: Callable[[str], None]) -> Path:
    from tokenskip.plugins import build_library, check_library

    if s.plugin_library:
        return check_library(s.plugin_library)
    log("plugin library: compiling or reusing the cached build (tokenskip plugins build)")
    return build_library(verbose=False)


def build_engines(export_dir: str | os.PathLike, out_dir: str | os.PathLike, **settings: Any) -> dict:
    """Build one engine per graph of the export into out_dir; returns the build report.

    settings: the fields of BuildSettings. Writes <graph>.engine and <graph>.report.json per
    graph, the plugin library (unless embedded or disabled) and engine.json for the runtime.
    """
    s0 = BuildSettings(**settings)
    log = s0.log or (lambda line: print(line, file=sys.stderr, flush=True))
    sidecar, files = read_export_graphs(export_dir)
    s = s0.resolve(sidecar)
    if s.precision is not None:
        exported = sidecar.get("dtype")
        backend_probe = flavour.get_flavour(s.backend)
        if backend_probe.always_strongly_typed and exported not in (None, s.precision):
            raise UserError(f"--{s.precision}: TensorRT-RTX builds strongly typed networks, so the precision is the "
                            f"export's ({exported}): re-export with --dtype {s.precision}, or drop --{s.precision}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    backend = flavour.get_flavour(s.backend)
    if s.timing_cache and backend.is_rtx:
        log("--timing-cache ignored: TensorRT-RTX tunes at run time (timing caches are no-ops there)")
    lib = None
    if s.plugins:
        lib = _plugin_library(s, log)
        backend.load_plugins(lib)
    else:
        backend.unload_plugins()
    lib_hash = hashlib.sha256(lib.read_bytes()).hexdigest() if lib else None
    targets = build_targets(backend, s.compute_capabilities)

    # build (or find) every engine in the cache first, so a failure leaves the out folder untouched
    engines: dict[str, dict] = {}
    for graph, onnx_path in files.items():
        onnx_hash, counts, dims = _onnx_summary(onnx_path)
        inputs = {n: spec.get("shape", dims.get(n)) for n, spec in sidecar["graphs"][graph].get("inputs", {}).items()}
        inputs = {**dims, **inputs}
        key = hashlib.sha256(json.dumps({
            "onnx": onnx_hash, "graph": graph, "backend": backend.name, "version": backend.version,
            "plugin_library": lib_hash, **s.engine_key_fields(), "targets": targets},
            sort_keys=True).encode()).hexdigest()[:24]
        cached = cache_dir() / "engines" / key
        if s.force or not (cached / "engine").is_file() or not (cached / "report.json").is_file():
            data, report = _build_one(backend, graph, onnx_path, inputs, s, lib, log, targets)
            report = _with_fallback(report, counts, s.plugins)
            report.update(onnx=str(onnx_path.resolve()), onnx_sha256=onnx_hash, cache_key=key,
                          plugin_library=str(lib) if lib else None, plugins_embedded=bool(lib and s.embed_plugins))
            write_bytes_atomic(cached / "engine", data)
            write_json_atomic(cached / "report.json", report)
            report["cached"] = False
        else:
            report = json.loads((cached / "report.json").read_text(encoding="utf-8"))
            report["cached"] = True
            log(f"[{graph}] engine up to date (cache {key}); --force rebuilds it")
        if s.plugins and report["fell_back"]:
            log(f"[{graph}] warning: {report['fallback']} tokenskip node(s) did not become plugin layers (missing "
                "plugin_namespace=\"tokenskip\" on the node?)")
        report["_cached_engine"] = cached / "engine"
        engines[graph] = report

    # engine.json is the commit marker: gone while the folder changes, written last
    out.mkdir(parents=True, exist_ok=True)
    (out / ENGINE_SIDECAR).unlink(missing_ok=True)
    for graph, report in engines.items():
        _place(report.pop("_cached_engine"), out / f"{graph}.engine")
        report["engine"] = str(out / f"{graph}.engine")
        write_json_atomic(out / f"{graph}.report.json", report)
        log(f"[{graph}] {report['engine_bytes'] / 1e6:.2f} MB, {len(report['plugin_layers'])} plugin layer(s) "
            f"-> {report['engine']}")

    shipped = None
    if lib is not None and not s.embed_plugins:
        shipped = lib.name
        _place(lib, out / shipped)
    # the folder is self-contained: the runtime needs the tokenizer, the benchmarks the routing
    carried = {}
    for key in ("tokenizer", "routers"):
        name = sidecar.get(key)
        if name and (Path(export_dir) / name).is_dir():
            _copy_folder(Path(export_dir) / name, out / name)
            carried[key] = name
    meta = {
        "format": ENGINE_FORMAT, "version": ENGINE_VERSION, "backend": backend.name,
        "tensorrt_version": backend.version, "compute_capabilities": targets, "model": sidecar.get("model"),
        "tokenizer": carried.get("tokenizer"), "routers": carried.get("routers"),
        "export_dir": str(Path(export_dir).resolve()), "dtype": sidecar.get("dtype"), "precision": s.precision,
        **s.limits(), "plugin_library": shipped,
        "plugins": s.plugins, "plugins_embedded": bool(lib and s.embed_plugins),
        # profile names in engine order, and their [min, opt, max] shapes per input (the runtime selects by name)
        "engines": {g: {"file": f"{g}.engine", "report": f"{g}.report.json", "profiles": list(r["profiles"]),
                        "profile_shapes": r["profiles"]} for g, r in engines.items()},
    }
    write_json_atomic(out / ENGINE_SIDECAR, meta)
    return {**meta, "out_dir": str(out), "reports": engines}
