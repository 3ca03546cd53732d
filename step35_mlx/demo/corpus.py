"""Training / evaluation corpus for the bundled demo model.

Everything here comes from text that ships with CPython itself, so it can be
rebuilt on any machine without a download:

* ``pydoc_data.topics.topics`` -- the language-reference pages that ``help()``
  shows (about 0.46 MB of English prose and grammar);
* docstrings of the pure-Python standard library, read with :mod:`ast` from the
  installed sources (nothing is imported or executed).

Both are cut into *units* (a reference-manual section, or one docstring).  Each
unit becomes a plain document ``<bos> text <|endoftext|>`` and, where it has a
subject, also a chat dialogue rendered with the released Step 3.5 Flash chat
template (user question, assistant ``<think>`` reasoning, answer = the unit's
first paragraph).  A deterministic ~5 % of the units -- and the dialogues built
from them -- are held out for evaluation.

The exact text depends on the CPython version (the topics and docstrings change
between releases); :func:`corpus_fingerprint` gives a hash to record with a
trained model.  This module has no third-party dependency except ``jinja2``
(only for rendering dialogues).
"""

from __future__ import annotations

import ast
import hashlib
import os
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

BOS = "<|begin_of_sentence|>"
EOS = "<|end_of_sentence|>"
EOT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"

#: Special tokens in id order (ids 0..11 of the demo tokenizer).
SPECIAL_TOKENS = [
    BOS,
    EOS,
    EOT,
    IM_START,
    IM_END,
    "<think>",
    "</think>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<im_patch>",
]

HELDOUT_FRACTION = 0.05
MAX_UNIT_CHARS = 2400  # long sections are cut at paragraph boundaries
MAX_ANSWER_CHARS = 700

_SKIP_DIRS = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "lib2to3",
    "tkinter",
    "turtledemo",
    "__pycache__",
    "ensurepip",
    "__phello__",
}

# --------------------------------------------------------------------------
# chat template


def template_path() -> Path:
    """Locate the released chat template (bundled copy first, then the repo reference)."""
    here = Path(__file__).resolve().parent
    candidates = [
        here / "chat_template.jinja",
        here.parent.parent.parent / "shared" / "reference" / "step3p5-flash-chat-template.jinja",
        Path("/work/shared/reference/step3p5-flash-chat-template.jinja"),
    ]
    env = os.environ.get("STEP35_CHAT_TEMPLATE")
    if env:
        candidates.insert(0, Path(env))
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError("Step 3.5 chat template not found; set STEP35_CHAT_TEMPLATE")


def load_chat_template() -> str:
    return template_path().read_text(encoding="utf-8")


_TEMPLATE_CACHE: dict = {}


def render_chat(messages: list[dict], add_generation_prompt: bool = False, template: str | None = None) -> str:
    """Render ``messages`` with the released template (the same jinja settings as transformers)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    text = template if template is not None else load_chat_template()
    tpl = _TEMPLATE_CACHE.get(text)
    if tpl is None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            import json

            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env.filters["tojson"] = tojson
        tpl = env.from_string(text)
        _TEMPLATE_CACHE[text] = tpl
    return tpl.render(messages=messages, bos_token=BOS, add_generation_prompt=add_generation_prompt, tools=None)


# --------------------------------------------------------------------------
# units


@dataclass
class Unit:
    source: str  # "topic" or "docstring"
    key: str  # stable identifier
    subject: str | None  # what a user would ask about (None: no dialogue)
    text: str  # the plain document text
    answer: str | None  # first paragraph, used as the dialogue answer


def _is_underline(line: str, above: str) -> bool:
    s = line.strip()
    return (
        len(s) >= 3
        and len(set(s)) == 1
        and s[0] in "*=-~^"
        and above.strip() != ""
        and len(line.rstrip()) == len(above.rstrip())
    )


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.strip("\n")) if p.strip()]


def _first_answer(body: str) -> str | None:
    """First paragraph of a section body; include a following grammar/code block if it is short."""
    paras = _paragraphs(body)
    if not paras:
        return None
    out = paras[0].strip()
    if len(paras) > 1 and out.endswith(":") and len(out) + len(paras[1]) < MAX_ANSWER_CHARS:
        out = out + "\n\n" + paras[1].rstrip()
    if len(out) > MAX_ANSWER_CHARS:
        # cut at a sentence end
        cut = out.rfind(". ", 0, MAX_ANSWER_CHARS)
        out = out[: cut + 1] if cut > 100 else out[:MAX_ANSWER_CHARS]
    return out


def _chunk(text: str, limit: int = MAX_UNIT_CHARS) -> list[str]:
    paras = re.split(r"(\n\s*\n)", text)
    chunks: list[str] = []
    cur = ""
    for piece in paras:
        if cur and len(cur) + len(piece) > limit and not piece.strip() == "":
            chunks.append(cur.strip("\n"))
            cur = ""
        cur += piece
    if cur.strip():
        chunks.append(cur.strip("\n"))
    return chunks


def _subject_from_heading(h: str) -> str:
    h = h.strip()
    if h.startswith("The "):
        h = "the " + h[4:]
    elif h[:1].isupper() and h[1:].split(" ")[0].islower() and all(not w[:1].isupper() for w in h.split(" ")[1:]):
        h = h[0].lower() + h[1:]  # "Assignment statements" -> "assignment statements"; "Type Objects" kept
    return h


def topic_units() -> list[Unit]:
    from pydoc_data.topics import topics

    units: list[Unit] = []
    for key in sorted(topics):
        lines = topics[key].replace("\r\n", "\n").split("\n")
        # split into sections at underlined headings
        starts = [i - 1 for i in range(1, len(lines)) if _is_underline(lines[i], lines[i - 1])]
        if not starts or starts[0] != 0:
            starts = [0] + starts
        bounds = starts + [len(lines)]
        for si in range(len(starts)):
            sec = lines[bounds[si] : bounds[si + 1]]
            if len(sec) >= 2 and _is_underline(sec[1], sec[0]):
                heading, body = sec[0].strip(), "\n".join(sec[2:])
            else:
                heading, body = None, "\n".join(sec)
            full = "\n".join(sec).strip("\n")
            if len(full) < 40:
                continue
            pieces = _chunk(full)
            for ci, piece in enumerate(pieces):
                first = ci == 0 and heading is not None
                units.append(
                    Unit(
                        source="topic",
                        key=f"topic:{key}:{si}:{ci}",
                        subject=_subject_from_heading(heading) if first else None,
                        text=piece,
                        answer=_first_answer(body) if first else None,
                    )
                )
    return units


def _signature(node) -> str:
    try:
        args = ast.unparse(node.args)
    except Exception:  # pragma: no cover - very old ast
        args = "..."
    return f"{node.name}({args})"


def docstring_units(min_chars: int = 200) -> list[Unit]:
    """Docstrings of the pure-Python standard library (read with ast, nothing imported)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    units: list[Unit] = []
    seen: set[str] = set()
    if not root.is_dir():
        return units
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        rel = Path(dirpath).relative_to(root)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            parts = list(rel.parts) + ([] if fn == "__init__.py" else [fn[:-3]])
            module = ".".join(parts) if parts else fn[:-3]
            if module.startswith("_") or ".-" in module:
                continue
            try:
                tree = ast.parse(Path(dirpath, fn).read_text(encoding="utf-8"))
            except Exception:
                continue
            stack = [(tree, module)]
            while stack:
                node, qual = stack.pop(0)
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                        if not child.name.startswith("_") or child.name in ("__init__", "__call__"):
                            stack.append((child, f"{qual}.{child.name}"))
                doc = ast.get_docstring(node)
                if not doc or len(doc) < min_chars:
                    continue
                doc = doc.strip()
                h = hashlib.sha1(doc.encode()).hexdigest()
                if h in seen:
                    continue
                seen.add(h)
                if isinstance(node, ast.Module):
                    head, subject = f"Module {qual}", f"the {qual} module"
                elif isinstance(node, ast.ClassDef):
                    head, subject = f"class {qual}", f"the class {qual}"
                else:
                    mod_q = qual.rsplit(".", 1)[0]
                    head, subject = f"{mod_q}.{_signature(node)}", f"{qual}()"
                text = head + "\n\n" + doc
                pieces = _chunk(text)
                for ci, piece in enumerate(pieces):
                    units.append(
                        Unit(
                            source="docstring",
                            key=f"doc:{qual}:{ci}",
                            subject=subject if ci == 0 else None,
                            text=piece,
                            answer=_first_answer(doc) if ci == 0 else None,
                        )
                    )
    return units


# --------------------------------------------------------------------------
# dialogues

_Q_TOPIC = [
    "What is {s}?",
    "Can you explain {s} in Python?",
    "Tell me about {s}.",
    "How does {s} work?",
    "I am learning Python. What should I know about {s}?",
]
_Q_DOC = [
    "What does {s} do?",
    "Explain {s}.",
    "Tell me about {s}.",
    "How do I use {s}?",
]
_THINK = [
    "The user asks about {s}. The Python documentation covers this, so I will answer from it.",
    "The question is about {s}. I should give a short, accurate explanation.",
    "I need to explain {s}. Let me recall what the documentation says and summarize it.",
    "This is a question about {s}. I will quote the relevant part of the reference.",
]
_SYSTEMS = [
    "You are a helpful assistant that explains Python.",
    "You are a concise technical assistant.",
]


def _dialogue_messages(unit: Unit, rng: random.Random) -> list[dict]:
    qs = _Q_TOPIC if unit.source == "topic" else _Q_DOC
    s = unit.subject
    q = rng.choice(qs).format(s=s)
    if q[:1].islower():
        q = q[0].upper() + q[1:]
    think = rng.choice(_THINK).format(s=s)
    msgs: list[dict] = []
    if rng.random() < 0.3:
        msgs.append({"role": "system", "content": rng.choice(_SYSTEMS)})
    msgs.append({"role": "user", "content": q})
    msgs.append({"role": "assistant", "content": f"<think>\n{think}\n</think>\n{unit.answer}"})
    return msgs


def build_dialogues(units: list[Unit], seed: int, template: str) -> list[str]:
    rng = random.Random(f"dialogues:{seed}")
    cands = [u for u in units if u.subject and u.answer and len(u.answer) >= 40]
    out: list[str] = []
    i = 0
    while i < len(cands):
        msgs = _dialogue_messages(cands[i], rng)
        # sometimes a two-turn conversation: the first turn's reasoning is dropped by the template
        if i + 1 < len(cands) and rng.random() < 0.2:
            more = _dialogue_messages(cands[i + 1], rng)
            msgs = msgs + [m for m in more if m["role"] != "system"]
            i += 1
        out.append(render_chat(msgs, template=template))
        i += 1
    return out


# --------------------------------------------------------------------------
# public API


def plain_document(text: str) -> str:
    return f"{BOS}{text}{EOT}"


def all_units(include_docstrings: bool = True) -> list[Unit]:
    units = topic_units()
    if include_docstrings:
        units += docstring_units()
    return units


def split_units(units: list[Unit], seed: int = 0, fraction: float = HELDOUT_FRACTION) -> tuple[list[Unit], list[Unit]]:
    """Deterministic split: a unit is held out when a seeded hash of its key falls under ``fraction``."""
    train, held = [], []
    for u in units:
        h = int(hashlib.sha256(f"{seed}:{u.key}".encode()).hexdigest()[:12], 16) / float(16**12)
        (held if h < fraction else train).append(u)
    return train, held


def build_corpus(seed: int = 0, include_docstrings: bool = True) -> tuple[list[str], list[str]]:
    """Return ``(train_docs, heldout_docs)`` -- fully rendered document strings.

    Plain documents are ``<|begin_of_sentence|>text<|endoftext|>``; dialogues are rendered
    with the released chat template (they start with the bos token and end with
    ``<|im_end|>\\n``).  Tokenize them with ``add_special_tokens=False``.  Train documents
    are shuffled with ``seed``; held-out documents keep a fixed order (plain, then chat).
    """
    template = load_chat_template()
    units = all_units(include_docstrings)
    train_u, held_u = split_units(units, seed)
    train = [plain_document(u.text) for u in train_u] + build_dialogues(train_u, seed, template)
    held = [plain_document(u.text) for u in held_u] + build_dialogues(held_u, seed + 1, template)
    random.Random(f"order:{seed}").shuffle(train)
    return train, held


def corpus_fingerprint(docs: list[str]) -> str:
    h = hashlib.sha256()
    for d in docs:
        h.update(d.encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


if __name__ == "__main__":  # pragma: no cover
    tr, he = build_corpus()
    print(len(tr), sum(map(len, tr)), len(he), sum(map(len, he)))
    print(corpus_fingerprint(tr)[:16], corpus_fingerprint(he)[:16])
    chats = [d for d in tr if d.startswith(BOS + IM_START) or IM_START in d]
    print(len(chats))
    print(chats[0])
