"""Evaluation metrics: answer extraction and equivalence, ROUGE, train/test overlap."""
