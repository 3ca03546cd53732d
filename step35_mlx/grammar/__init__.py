"""Constrained decoding: ``response_format`` and forced tool calls as token masks (llguidance).

:mod:`.spec` turns the API options into a :class:`Constraint` (a JSON schema, or a set of
tools one of which must be called); :mod:`.engine` compiles it for a tokenizer into a
logits processor that masks every token the grammar forbids, from the first token after
``</think>`` on. The processor reads its position from the token context it is given, so
plain decoding and MTP speculative decoding (drafts and verify rows, rejected drafts rolled
back) use it unchanged. Needs the optional dependency ``llguidance`` (extra ``grammar``).
"""

from .spec import Constraint, constraint_for

__all__ = ["Constraint", "constraint_for", "GrammarProcessor", "grammar_processor"]


def __getattr__(name: str):
    if name in ("GrammarProcessor", "grammar_processor"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
