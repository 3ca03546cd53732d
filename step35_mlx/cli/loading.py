"""The one load path of every command that runs a model: resolve -> plan -> load, config parsed once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from .common import fail


@dataclass
class LoadedModel:
    """What a command needs to run a model, named so that callers cannot mix the parts up."""

    model: Any  # step35_mlx.Model
    tokenizer: Any  # mlx-lm TokenizerWrapper
    path: Path
    generation_config: dict
    context_limit: int  # tokens: --max-context, or the longest that fits this machine
    streams: int = 1  # CPU streams decode runs on (streams.choose_streams)


def load_for_cli(model: Optional[str], announce: Callable[[str], None], *, max_context: Optional[int] = None,
                 kv_bits: Optional[int] = None, mtp: Optional[bool] = None, prefill_step: int = 512,
                 parallel: Optional[str] = None, split: Optional[str] = None, cache_ram: int = 0,
                 images: bool = False, vision: bool = True, streams: Optional[int] = None) -> LoadedModel:
    """Load a model for a command, or print one red line and exit 2.

    Before any weight is read, the memory plan (``step35_mlx.plan.preflight``) must fit this
    machine: for ``max_context`` when given, else for the longest context that fits (which
    becomes the limit). A model that does not fit is refused with the options that would fit.
    ``cache_ram``: bytes the prefix cache may hold in RAM, planned with the rest.
    ``parallel`` (tensor, expert, pipeline): this rank's share only, under ``mlx.launch``.
    ``images``: the request has pictures, so a model without a vision tower is refused up front.
    ``vision=False`` leaves a Step 3.7 vision tower unloaded.
    ``streams``: ``--streams`` (None: the tuned or default count, ``streams.choose_streams``).
    """
    if parallel is not None:
        from .parallel import load_parallel_for_cli

        if streams == 2:
            fail("--streams 2 does not work with --parallel (each rank decodes on one stream)")

        return load_parallel_for_cli(model, announce, parallel, split, mtp=mtp is not False,
                                     max_context=max_context, kv_bits=kv_bits)
    from ..hub import DEMO_DIR, ModelNotFoundError, resolve_model
    from ..loader import CheckpointError, load
    from ..mlx_lm_format import read_folder
    from ..plan import InsufficientMemoryError, preflight
    from ..settings import read_generation_config
    from ..costs import decode_step_bytes
    from ..streams import choose_streams, use_two_streams
    from ..tuned import load_streams

    try:
        path = resolve_model(model)
    except ModelNotFoundError as e:
        fail(str(e))
    if model is None:
        announce(f"No --model given: using the bundled demo model ({DEMO_DIR}). "
                 "Pass --model PATH|REPO to chat with Step 3.5 Flash.")
    keep_mtp = mtp is not False
    try:
        folder = read_folder(path)
        plan = preflight(path, folder_format=folder, context=max_context, kv_bits=kv_bits, mtp=keep_mtp,
                         prefill_step=prefill_step, prefix_cache=cache_ram)
    except InsufficientMemoryError as e:
        head, _, options = str(e).partition("\n")
        typer.secho(f"error: {head}", fg=typer.colors.RED, err=True)
        typer.echo(options, err=True)
        raise typer.Exit(2)
    except CheckpointError as e:
        fail(f"cannot load {path}: {e}")
    except (ValueError, OSError) as e:
        fail(str(e))
    if images:
        from ..vision.config import VisionConfig
        from ..vision.files import NO_VISION

        if not vision:
            fail("images need the vision tower; drop --no-vision")
        if VisionConfig.from_config(folder.config.raw) is None:
            fail(NO_VISION)
    try:
        choose_streams(streams)  # a --streams the device cannot take fails before any weight is read
    except ValueError as e:
        fail(str(e))
    if max_context is None and plan.context < folder.config.max_position_embeddings:
        announce(f"Context limited to {plan.context:,} tokens so that the model fits this machine's memory "
                 f"(`step35-mlx plan --model {path}` shows the options).")
    try:
        m, tok = load(path, folder_format=folder, mtp=keep_mtp, vision=vision)
        n_streams = choose_streams(streams, load_streams(path), decode_step_bytes(m))
        use_two_streams(m, n_streams == 2)
        generation_config = read_generation_config(path, warn=announce)
    except (ValueError, OSError) as e:
        fail(f"cannot load {path}: {e}")
    return LoadedModel(m, tok, path, generation_config, plan.context, n_streams)
