"""``python -m step35_mlx`` runs the ``step35-mlx`` command line."""

from .cli import app

app()
