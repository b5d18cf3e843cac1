"""zerotune: fast, exact fine-tuning of language models from one LLaMA-Factory style YAML."""

__version__ = "0.1.0"
