"""Evaluation: perplexity by the eval protocol (non-overlapping windows, bos prepended once)."""
from qat.eval.perplexity import NextTokenPerplexity, evaluate_file, perplexity

__all__ = ["NextTokenPerplexity", "evaluate_file", "perplexity"]
