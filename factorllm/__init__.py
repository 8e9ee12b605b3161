"""FactorLLM: turn a dense Llama-family model into a Mixture-of-Experts by splitting its FFNs."""

__version__ = "0.1.0"
