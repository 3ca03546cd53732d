"""The HTTP server (``step35-mlx serve``): OpenAI- and Anthropic-compatible endpoints for one model.

``app`` builds the routes; ``engine`` runs generations on one worker thread behind a bounded
queue; ``messages`` maps each API's messages onto the chat template; ``reply`` accumulates
answers; ``errors`` answers in each API's error shape; ``schemas`` are the request bodies.
"""

from .app import create_app

__all__ = ["create_app"]
