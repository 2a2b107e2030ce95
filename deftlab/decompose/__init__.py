"""Decomposition of linear layers: whitened (SVD-LLM) and plain SVD, calibration statistics, caching."""
