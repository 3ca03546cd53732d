"""Pieces every command shares: the one-red-line failure, terminal-safe text, shared options."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn

import typer

_CONTROL = {c: None for c in range(32) if c not in (9, 10)} | {127: None}

MODEL_OPTION = typer.Option(None, "--model", "-m", help="Model folder, Hugging Face repo id, or 'demo' (default: the bundled demo model).")
MTP_OPTION = typer.Option(None, "--mtp/--no-mtp", help="Speculative decoding with the MTP heads (default: what `step35-mlx tune` chose for this model, else off).")
DRAFT_DEPTH_OPTION = typer.Option(None, "--draft-depth", help="MTP draft tokens per step (1-3; implies --mtp).")
MAX_CONTEXT_OPTION = typer.Option(None, "--max-context", help="Context limit in tokens (default: the model's, or the longest that fits this machine's memory).")
PREFILL_STEP_OPTION = typer.Option(512, "--prefill-step", help="Prompt tokens per prefill chunk; smaller bounds memory on long prompts.")
KV_BITS_OPTION = typer.Option(None, "--kv-bits", help="Store the KV cache quantized (4 or 8 bits).")
VISION_OPTION = typer.Option(True, "--vision/--no-vision", help="Step 3.7: load the vision tower (default) or skip its ~4 GB when no images are needed.")
STREAMS_OPTION = typer.Option(None, "--streams", min=1, max=2, help="CPU streams for decoding: 2 splits each step's work over two cores, same output (default: what `step35-mlx tune` measured for this model, else 2 on the CPU device with 2+ cores for models that read 16 MiB or more a token; always 1 on a GPU).")
SEED_OPTION = typer.Option(None, "--seed", help="Random seed for reproducible sampling (0 to 2^64-1).")
CACHE_DISK_OPTION = typer.Option("0", "--cache-disk", help="Prefix cache on SSD (e.g. 64GB): KV state of earlier prompts, kept across runs; 0 (default) = off.")
CACHE_DIR_OPTION = typer.Option(Path("~/.cache/step35-mlx/kv"), "--cache-dir", help="Folder of the SSD prefix cache (one subfolder per model and KV format).")


def cache_budgets(cache_ram: str, cache_disk: str, cache_dir: Path) -> tuple[int, int]:
    """``--cache-ram`` / ``--cache-disk`` in bytes, or one red line (checked before the model loads)."""
    from ..prefix_cache import parse_budget

    try:
        ram, disk = parse_budget(cache_ram, "--cache-ram"), parse_budget(cache_disk, "--cache-disk")
    except ValueError as e:
        fail(str(e))
    if disk and cache_dir.expanduser().exists() and not cache_dir.expanduser().is_dir():
        fail(f"--cache-dir {cache_dir} is not a folder")
    return ram, disk


def open_prefix_cache(model, ram: int, disk: int, cache_dir: Path, warn, kv_bits: int | None = None):
    """The ``PrefixCache`` for these budgets (``None`` when both are 0), or one red line."""
    from ..prefix_cache import PrefixCache

    if not ram and not disk:
        return None
    try:
        return PrefixCache(model, ram_bytes=ram, disk_bytes=disk, cache_dir=cache_dir, kv_bits=kv_bits, warn=warn)
    except ValueError as e:
        fail(str(e))
    except OSError as e:
        fail(f"--cache-dir {cache_dir}: {e.strerror or e}")
SYSTEM_OPTION = typer.Option(None, "--system", "-s", help="System prompt.")
MAX_TOKENS_OPTION = typer.Option(None, "--max-tokens", "-n", help="Most tokens per answer (default: generation_config.json, else 8192, within the context).")
TEMPERATURE_OPTION = typer.Option(None, "--temperature", "-t", help="Sampling temperature; 0 is greedy (default: generation_config.json, else 1.0).")
TOP_P_OPTION = typer.Option(None, "--top-p", help="Nucleus sampling mass (default: generation_config.json, else 0.95).")
TOP_K_OPTION = typer.Option(None, "--top-k", help="Keep the k most likely tokens; 0 = off.")
MIN_P_OPTION = typer.Option(None, "--min-p", help="Drop tokens below min_p x the top probability.")


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one red ``error:`` line on stderr and exit with ``code``."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def printable(text: str) -> str:
    """Model text made safe for a terminal (no escape or other control characters)."""
    return text.translate(_CONTROL)


def stats_line(st, interrupted: bool = False) -> str:
    """One line of generation statistics for the terminal."""
    parts = [f"{st.generation_tokens} tokens, {st.generation_tps:.1f} tok/s"]
    reused = st.prompt_tokens - st.prefill_tokens
    where = f" ({st.cached_from})" if reused and getattr(st, "cached_from", "") else ""
    parts.append(f"prompt {st.prefill_tokens} new" + (f" + {reused} cached{where}" if reused else "")
                 + f" at {st.prompt_tps:.0f} tok/s")
    if st.draft_depth:
        acc = "/".join(f"{a:.2f}" for a in st.acceptance)
        parts.append(f"MTP d={st.draft_depth}: {st.tokens_per_verify:.2f} tok/verify, accept {acc}")
    parts.append(f"context {st.context_tokens}/{st.context_limit}")
    gb = st.peak_memory_gb
    parts.append(f"peak {gb:.2f} GB" if gb >= 1 else f"peak {gb * 1000:.0f} MB")
    if interrupted:
        parts.append("interrupted")
    return " · ".join(parts)
