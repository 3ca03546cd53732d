"""step35-mlx: run StepFun's Step 3.5 Flash with MLX.

Public API: ``load`` (model + tokenizer), ``load_model``, and ``Model`` with
``model(tokens, cache)``, ``model.forward_hidden(tokens, cache)`` and ``model.make_cache()``.
"""

from .config import ModelConfig
from .loader import CheckpointError, load, load_model
from .model import Model

__version__ = "0.1.0"

__all__ = ["CheckpointError", "Model", "ModelConfig", "load", "load_model", "__version__"]
