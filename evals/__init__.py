"""Evaluation: metrics (perplexity, KL, top-1, embedding cosine, size, bpw) and the eval report."""
