"""tokenskip.export: the routed model as ONNX (prefill + decode graphs with tokenskip custom ops)
and its validation in ONNX Runtime. See docs/export.md.

    from tokenskip.export import export_model, run_validation
"""

from __future__ import annotations


def export_model(*args, **kwargs):
    """See tokenskip.export.exporter.export_model (imported lazily: onnx/onnxscript are an extra)."""
    from .exporter import export_model as _export_model

    return _export_model(*args, **kwargs)


def run_validation(*args, **kwargs):
    """See tokenskip.deploy.runtime.validate.run_validation."""
    from .validate import run_validation as _run_validation

    return _run_validation(*args, **kwargs)
