"""tokenskip: FTP token-wise pruning for Hugging Face causal LMs, from router training to TensorRT."""

__version__ = "0.1.0"
