"""step35-mlx: run StepFun's Step 3.5 Flash with MLX.

Public API: ``load`` (model + tokenizer), ``load_model``, ``Model`` with
``model(tokens, cache)``, ``model.forward_hidden(tokens, cache)``, ``model.make_cache()`` and
``model.mtp_logits(tokens, hidden)``; ``generate`` / ``stream_generate`` and ``ChatSession``.
"""

from .config import ModelConfig
from .generate import generate, stream_generate
from .loader import CheckpointError, load, load_model
from .model import Model
from .session import ChatSession

__version__ = "0.1.0"

__all__ = ["ChatSession", "CheckpointError", "Model", "ModelConfig", "generate", "load", "load_model",
           "stream_generate", "__version__"]
