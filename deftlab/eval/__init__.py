"""Evaluation of a model in memory: greedy generation on a task's test sets, perplexity on named corpora."""
