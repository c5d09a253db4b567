"""Greta: Llama-family inference engine and B3.77 prefill/decode audit."""
__version__ = "0.1.0"
