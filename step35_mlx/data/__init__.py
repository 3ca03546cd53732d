"""Bundled reference files: the released Step 3.5 Flash ``config.json`` and chat template.

They let the planner, ``convert --dry-run`` and the tests use the real shapes
without downloading anything.
"""

from __future__ import annotations

import json
from pathlib import Path

DATA_DIR = Path(__file__).parent
RELEASE_CONFIG = DATA_DIR / "step3p5-flash-config.json"
CHAT_TEMPLATE = DATA_DIR / "step3p5-flash-chat-template.jinja"


def release_config() -> dict:
    """The released ``stepfun-ai/Step-3.5-Flash`` config.json as a dict."""
    return json.loads(RELEASE_CONFIG.read_text())
