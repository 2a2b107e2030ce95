"""Compact storage of fine-tuned weight updates ΔW (OSD and its baselines)."""
