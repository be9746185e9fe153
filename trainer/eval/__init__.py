"""Evaluation and inference: perplexity and HellaSwag, lm-evaluation-harness, generation, loading
any --model-path, and where inference runs.
"""
