"""What an engine is built for: the build settings, the optimisation profiles and the target GPUs.

Kept apart from the builder (build.py) so the runtime, engine.json and the tests (the fake TensorRT
of tests/fake_trt.py takes its profiles from here) reason about profiles, limits and compute
capabilities without TensorRT.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from tokenskip.errors import UserError

# TensorRT-RTX builds ahead of time for these GPUs by default (its docs: "8.0, 8.6, 8.9, 12.0");
# we set them explicitly so engine.json records exactly what the engine runs on.
RTX_DEFAULT_TARGETS = ("8.0", "8.6", "8.9", "12.0")
# "phases" (default): a prefill and a decode profile in ONE engine, each tuned for the shapes its
# phase really runs; "shared": one profile for both (tuned for prefill). Measured with TensorRT-RTX
# 1.7 on smollm2-135m fp32: 1033 MB vs 581 MB, as RTX keeps a copy of the weights per profile
# (docs/export.md, "One graph, weights once"); `--profiles shared` is the memory-lean choice there.
PROFILE_MODES = ("phases", "shared")
# Bumped whenever the profile shapes for the same flags change, so cached engines are rebuilt.
PLAN_VERSION = 2


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
    profiles: str = "phases"            # cache graphs: "phases" (prefill + decode profiles) or "shared" (one)
    force: bool = False
    log: Callable[[str], None] | None = None  # progress lines (default: stderr)

    def resolve(self, sidecar: dict) -> "BuildSettings":
        """Validate the flags (UserError naming the flag) and fill defaults from the sidecar."""
        s = dataclasses.replace(self)
        if s.precision is not None and s.precision not in ("fp16", "bf16"):
            raise UserError(f"precision {s.precision!r}: use --fp16 or --bf16")
        if s.profiles not in PROFILE_MODES:
            raise UserError(f"--profiles {s.profiles}: choose from {', '.join(PROFILE_MODES)}")
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

    def limits(self) -> dict:
        """What the runtime enforces, recorded in engine.json (the profiles' bounds)."""
        return {"min_seq_len": self.min_seq_len, "opt_seq_len": self.opt_seq_len, "max_seq_len": self.max_seq_len,
                "opt_batch": self.opt_batch, "max_batch": self.max_batch}

    def engine_key_fields(self) -> dict:
        return {"plan": PLAN_VERSION, "precision": self.precision, "profiles": self.profiles,
                "seq": [self.min_seq_len, self.opt_seq_len, self.max_seq_len],
                "batch": [1, self.opt_batch, self.max_batch], "plugins": self.plugins, "embed": self.embed_plugins}


def profile_shapes(inputs: dict[str, list], s: BuildSettings, phase: str | None = None) -> dict[str, list[list[int]]]:
    """{input: [min, opt, max] shapes} of one optimisation profile.

    "batch" -> [1, opt_batch, max_batch] in every profile. The optimum is a shape the phase really
    runs, because TensorRT picks its kernels for it:
    - "prefill": "seq" (new tokens) [min_seq_len, opt_seq_len, max_seq_len], every cache dim
      "past_*" [0, 0, max_seq_len] (an empty past; longer ones allow chunked prefill);
    - "decode": "seq" 1, "past_*" [1, opt_seq_len, max_seq_len] (one token against a typical
      prompt's cache);
    - "shared": prefill's ranges for "seq", [0, 0, max_seq_len] for "past_*" (tuned for prefill,
      the compute-bound phase; decode runs on the same kernels).
    Without a phase (graphs with no cache inputs) every named dim takes the seq range.
    """
    seq = (s.min_seq_len, s.opt_seq_len, s.max_seq_len)
    out = {}
    for name, dims in inputs.items():
        lo, opt, hi = [], [], []
        for d in dims:
            past = str(d).startswith("past_")
            if isinstance(d, int) and d > 0:
                rng = (d, d, d)
            elif d == "batch":
                rng = (1, s.opt_batch, s.max_batch)
            elif past and phase in ("prefill", "shared"):
                rng = (0, 0, s.max_seq_len)
            elif past and phase == "decode":
                rng = (1, s.opt_seq_len, s.max_seq_len)
            elif phase == "decode" and d == "seq":
                rng = (1, 1, 1)
            else:
                rng = seq
            lo.append(rng[0]); opt.append(rng[1]); hi.append(rng[2])
        out[name] = [lo, opt, hi]
    return out


def phase_profiles(inputs: dict[str, list], s: BuildSettings) -> dict[str, dict[str, list[list[int]]]]:
    """The engine's optimisation profiles, in order, by name. A graph with cache inputs gets a
    "prefill" and a "decode" profile (the default; kernels chosen per phase, as TensorRT-LLM runs
    its context and generation phases, in one engine), or with profiles="shared" one profile for
    both. Other graphs get one "default" profile."""
    if any(str(d).startswith("past_") for dims in inputs.values() for d in dims):
        phases = ("prefill", "decode") if s.profiles == "phases" else ("shared",)
        return {phase: profile_shapes(inputs, s, phase) for phase in phases}
    return {"default": profile_shapes(inputs, s)}


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


def set_targets(backend, config, targets: list[str] | None) -> None:
    if backend.is_rtx and targets:
        trt = backend.trt
        config.num_compute_capabilities = len(targets)
        for i, v in enumerate(targets):
            config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{v.replace('.', '')}"), i)
