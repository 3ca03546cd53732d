"""Quantization recipes and quality checks."""
