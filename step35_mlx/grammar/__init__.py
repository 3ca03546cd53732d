"""Constrained decoding: ``response_format`` and tool calls as token masks (llguidance).

:mod:`.spec` turns the API options into a :class:`Constraint` (a JSON schema, or a set of
tools one of which must be called, or which the model may call under ``tool_choice: "auto"``);
:mod:`.factory` compiles it for a tokenizer (grammars in :mod:`.engine` and :mod:`.calls`) into
a logits processor that masks every token the grammar forbids, from the first token after
``</think>`` on (auto: from the model's own ``<tool_call>`` on, :mod:`.auto`). The processor
reads its position from the token context it is given, so plain decoding and MTP speculative
decoding (drafts and verify rows, rejected drafts rolled back) use it unchanged. Needs the
optional dependency ``llguidance`` (extra ``grammar``), imported only when a constraint is compiled.
"""

from .engine import GrammarProcessor
from .factory import grammar_processor
from .spec import Constraint, constraint_for

__all__ = ["Constraint", "constraint_for", "GrammarProcessor", "grammar_processor"]
