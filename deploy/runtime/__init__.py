"""Runtimes behind one Backend interface (PyTorch, ONNX Runtime, TensorRT), their KV caches and the one generation loop."""
