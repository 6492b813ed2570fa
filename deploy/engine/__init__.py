"""TensorRT engines: the build plan, the build, and the TensorRT flavour (full TensorRT or TensorRT-RTX)."""
