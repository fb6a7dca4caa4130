"""neoxlab: train GPT-NeoX-architecture language models."""

__version__ = "0.1.0"
