"""Scoring of model outputs: pure functions on strings (answer extraction, ROUGE, train/test overlap)."""
