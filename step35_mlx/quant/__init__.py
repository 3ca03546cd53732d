"""Quantization recipes (``recipes``: named recipes, policy, exact sizes) and quality checks
(``quality.quant_eval``: KL and top-1 agreement against a reference)."""
