"""tokenskip serve: an OpenAI-compatible server over the deploy backends (docs/serving.md)."""
