"""Build TensorRT engines (prefill + decode) from a `tokenskip export` folder.

For each graph of the export: parse the ONNX file (external data resolved next to it) with our
plugin library registered, so every `tokenskip::TopKGather` / `ScatterTokens` node becomes a
plugin layer (no TopK K <= 3840 cap), or, with plugins off, from the model-local function bodies
the parser inlines when no creator is registered. One optimisation profile per engine, built from
the sidecar's input shapes ("batch" -> [1, opt_batch, max_batch], every other named dimension ->
[min_seq, opt_seq, max_seq]). Engines are cached in `cache_dir()/engines/<key>/` keyed by the ONNX
hash (with its external data) and every setting that changes the engine; files are written
atomically, so a failed build leaves no partial engine. Each engine gets a JSON build report:
layers by type, plugin layers, whether any tokenskip node fell back to its function body, build
time, engine size.
"""

from __future__ import annotations

import collections
import dataclasses
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

from . import tensorrt_backend

ENGINE_SIDECAR = "engine.json"  # read by deploy/trt_runtime.py; written last: the folder's commit marker
ENGINE_FORMAT, ENGINE_VERSION = "tokenskip-engines", 1
# TensorRT-RTX builds ahead of time for these GPUs by default (its docs: "8.0, 8.6, 8.9, 12.0");
# we set them explicitly so engine.json can record exactly what the engine runs on.
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")
TOKENSKIP_DOMAIN = "tokenskip"
TOKENSKIP_OPS = ("TopKGather", "ScatterTokens")
PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclasses.dataclass
class BuildSettings:
    """Everything that shapes an engine (CLI flags of `tokenskip build`)."""

    backend: str | None = None          # "tensorrt" | "tensorrt-rtx" | None (full TensorRT if installed)
    precision: str | None = None        # None: as exported; "fp16" / "bf16"
    min_seq_len: int = 1
    opt_seq_len: int | None = None      # default: min(512, max_seq_len)
    max_seq_len: int | None = None      # default: the export's max_seq_len, else 2048
    max_batch: int = 1
    opt_batch: int = 1
    plugins: bool = True
    embed_plugins: bool = False
    plugin_library: str | None = None   # default: build_library() (compiled once, cached)
    timing_cache: str | None = None
    compute_capabilities: list[str] | None = None  # TensorRT-RTX targets (default RTX_DEFAULT_TARGETS)
    force: bool = False
    log: Callable[[str], None] | None = None  # progress lines (default: stderr)

    def resolve(self, sidecar: dict) -> "BuildSettings":
        """Validate the flags (UserError naming the flag) and fill defaults from the sidecar."""
        s = dataclasses.replace(self)
        if s.precision is not None and s.precision not in ("fp16", "bf16"):
            raise UserError(f"precision {s.precision!r}: use --fp16 or --bf16")
        if s.max_seq_len is None:
            exported = sidecar.get("max_seq_len")
            s.max_seq_len = int(exported) if isinstance(exported, int) and exported > 0 else 2048
        if s.min_seq_len < 1:
            raise UserError(f"--min-seq-len {s.min_seq_len}: must be >= 1")
        if s.max_seq_len < s.min_seq_len:
            raise UserError(f"--min-seq-len {s.min_seq_len} > --max-seq-len {s.max_seq_len}")
        if s.max_batch < 1:
            raise UserError(f"--max-batch {s.max_batch}: must be >= 1")
        opt = s.opt_seq_len if s.opt_seq_len is not None else 512
        s.opt_seq_len = min(max(opt, s.min_seq_len), s.max_seq_len)  # min <= opt <= max
        s.opt_batch = min(max(s.opt_batch, 1), s.max_batch)
        if s.embed_plugins and not s.plugins:
            raise UserError("--embed-plugins and --no-plugins exclude each other")
        if s.timing_cache is not None and Path(s.timing_cache).is_dir():
            raise UserError(f"--timing-cache {s.timing_cache}: is a folder, expected a file")
        return s

    def engine_key_fields(self) -> dict:
        return {"precision": self.precision, "seq": [self.min_seq_len, self.opt_seq_len, self.max_seq_len],
                "batch": [1, self.opt_batch, self.max_batch], "plugins": self.plugins, "embed": self.embed_plugins}


# ------------------------------------------------------------------------------------ the export
def read_export_graphs(export_dir: str | os.PathLike) -> tuple[dict, dict[str, Path]]:
    """(sidecar, {graph name: onnx path}) of an export folder, through the one sidecar reader."""
    side = read_export(export_dir, "EXPORT_DIR", required=("prefill",))
    return side, {name: Path(export_dir) / entry["file"] for name, entry in side["graphs"].items()}


def parse_compute_capabilities(text: str | None) -> list[str] | None:
    """'8.6,89,sm_120' -> ['8.6', '8.9', '12.0'] (the spelling engine.json records)."""
    if text is None:
        return None
    out = []
    for raw in str(text).split(","):
        v = raw.strip().lower().removeprefix("sm_").removeprefix("sm")
        if not v:
            continue
        if "." not in v and v.isdigit() and len(v) >= 2:
            v = f"{v[:-1]}.{v[-1]}"
        major, _, minor = v.partition(".")
        if not (major.isdigit() and minor.isdigit()):
            raise UserError(f"--compute-capability {text}: expected values like 8.6, 89 or sm_120")
        out.append(f"{int(major)}.{int(minor)}")
    if not out:
        raise UserError(f"--compute-capability {text}: give at least one value")
    return sorted(set(out), key=lambda v: tuple(map(int, v.split("."))))


def build_targets(backend, requested: list[str] | None) -> list[str] | None:
    """Compute capabilities the engine will run on: TensorRT-RTX's explicit targets, or the GPU a
    full TensorRT build runs on (full TensorRT engines are specific to the building GPU)."""
    trt = backend.trt
    if backend.is_rtx:
        targets = requested or list(RTX_DEFAULT_TARGETS)
        names = [f"SM{v.replace('.', '')}" for v in targets]
        bad = [v for v, n in zip(targets, names) if not hasattr(trt.ComputeCapability, n)]
        if bad:
            known = sorted(k[2:] for k in dir(trt.ComputeCapability) if k.startswith("SM"))
            raise UserError(f"--compute-capability {','.join(bad)}: TensorRT-RTX {backend.version} builds for "
                            f"{', '.join(f'{k[:-1]}.{k[-1]}' for k in known)}")
        return targets
    if requested:
        raise UserError("--compute-capability applies to TensorRT-RTX; full TensorRT builds for the GPU it runs on")
    import torch

    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return [f"{major}.{minor}"]
    return None


def _set_targets(backend, config, targets: list[str] | None) -> None:
    if backend.is_rtx and targets:
        trt = backend.trt
        config.num_compute_capabilities = len(targets)
        for i, v in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{v.replace('.', '')}"), i)


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


def profile_shapes(inputs: dict[str, list], s: BuildSettings) -> dict[str, list[list[int]]]:
    """{input: [min, opt, max] shapes}: "batch" -> batch range, any other named dim -> seq range."""
    out = {}
    for name, dims in inputs.items():
        lo, opt, hi = [], [], []
        for d in dims:
            if isinstance(d, int) and d > 0:
                rng = (d, d, d)
            elif d == "batch":
                rng = (1, s.opt_batch, s.max_batch)
            else:
                rng = (s.min_seq_len, s.opt_seq_len, s.max_seq_len)
            lo.append(rng[0]); opt.append(rng[1]); hi.append(rng[2])
        out[name] = [lo, opt, hi]
    return out


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
    if not parser.parse_from_file(str(onnx_path)):
        errs = [parser.get_error(i).desc() for i in range(parser.num_errors)] or logger.errors() or ["unknown error"]
        raise UserError(f"{onnx_path}: TensorRT ({backend.name}) cannot parse it: {errs[0]}")
    summary = _network_summary(backend, network)
    net_inputs = [network.get_input(i) for i in range(network.num_inputs)]
    shapes = profile_shapes({t.name: inputs.get(t.name, [d if d >= 0 else "?" for d in t.shape]) for t in net_inputs}, s)
    config = builder.create_builder_config()
    _set_targets(backend, config, targets)
    if weak:
        config.set_flag(trt.BuilderFlag.FP16 if s.precision == "fp16" else trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)
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
    log(f"[{graph}] building engine ({backend.name} {backend.version}; batch {lo_b}..{hi_b}, "
        f"seq {s.min_seq_len}..{s.opt_seq_len}..{s.max_seq_len}); this can take minutes")
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
        "precision": s.precision or "as exported", "profile": shapes, "compute_capabilities": targets,
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
        backend_probe = tensorrt_backend.get_backend(s.backend)
        if backend_probe.always_strongly_typed and exported not in (None, s.precision):
            raise UserError(f"--{s.precision}: TensorRT-RTX builds strongly typed networks, so the precision is the "
                            f"export's ({exported}): re-export with --dtype {s.precision}, or drop --{s.precision}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    backend = tensorrt_backend.get_backend(s.backend)
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
        "max_seq_len": s.max_seq_len, "max_batch": s.max_batch, "plugin_library": shipped,
        "plugins": s.plugins, "plugins_embedded": bool(lib and s.embed_plugins),
        "engines": {g: {"file": f"{g}.engine", "report": f"{g}.report.json"} for g in engines},
    }
    write_json_atomic(out / ENGINE_SIDECAR, meta)
    return {**meta, "out_dir": str(out), "reports": engines}
