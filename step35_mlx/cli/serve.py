"""``step35-mlx serve``: an OpenAI- and Anthropic-compatible HTTP server for one model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import (CACHE_DIR_OPTION, CACHE_DISK_OPTION, MAX_CONTEXT_OPTION, MODEL_OPTION, MTP_OPTION,
                     STREAMS_OPTION, VISION_OPTION, cache_budgets, fail, open_prefix_cache)
from .loading import load_for_cli
from .parallel import PARALLEL_OPTION, SPLIT_OPTION


def serve(
    model: Optional[str] = MODEL_OPTION,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8080, "--port", "-p", min=1, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="STEP35_API_KEY", help="Require this key ('Authorization: Bearer KEY' or 'x-api-key: KEY')."),
    max_queue: int = typer.Option(8, "--max-queue", min=0, help="Requests that may wait while one generates; more get 429."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id reported by /v1/models (default: the folder name)."),
    max_context: Optional[int] = MAX_CONTEXT_OPTION,
    mtp: Optional[bool] = MTP_OPTION,
    max_body: str = typer.Option("8MB", "--max-body", help="Largest request body accepted (e.g. 8MB, 512KB); larger requests get 413 before they are read."),
    cache_ram: str = typer.Option("8GB", "--cache-ram", help="Prefix cache in RAM: KV state of earlier prompts reused by every client (0 turns it off)."),
    cache_disk: str = CACHE_DISK_OPTION,
    cache_dir: Path = CACHE_DIR_OPTION,
    parallel: Optional[str] = PARALLEL_OPTION,
    split: Optional[str] = SPLIT_OPTION,
    allow_local_images: bool = typer.Option(False, "--allow-local-images", help="Step 3.7: accept images given as local file paths / file:// URLs (files this machine can read)."),
    allow_remote_images: bool = typer.Option(False, "--allow-remote-images", help="Step 3.7: fetch images given as http(s) URLs."),
    max_images: int = typer.Option(8, "--max-images", min=1, help="Step 3.7: most images in one request; more get 400."),
    max_image_size: str = typer.Option("10MB", "--max-image-size", help="Step 3.7: largest encoded image accepted (e.g. 10MB); larger get 400."),
    vision: bool = VISION_OPTION,
    streams: Optional[int] = STREAMS_OPTION,
) -> None:
    """Serve a model over HTTP for OpenAI and Anthropic clients (Claude Code, opencode, SDKs).

    Example: step35-mlx serve --model ~/models/step35-q4 --port 8080 --api-key secret
    """
    try:
        import uvicorn

        from ..server import create_app
    except ImportError as e:
        fail(f"the server needs FastAPI and uvicorn ({e.name} is missing): pip install 'step35-mlx[serve]'")
    from ..convert.quantize import parse_size

    try:
        max_body_bytes = parse_size(max_body)
    except ValueError as e:
        fail(f"--max-body: {e}")
    try:
        max_image_bytes = parse_size(max_image_size)
    except ValueError as e:
        fail(f"--max-image-size: {e}")
    ram, disk = cache_budgets(cache_ram, cache_disk, cache_dir)
    if parallel is not None and (ram or disk):
        # each rank holds only its share of the KV state: a prefix cache would store partial entries
        if disk:
            fail("--cache-disk does not work with --parallel yet (each rank holds part of the cache)")
        ram = 0
    loaded = load_for_cli(model, lambda text: typer.echo(text, err=True), max_context=max_context, mtp=mtp,
                          parallel=parallel, split=split, cache_ram=ram, vision=vision,
                          streams=streams)
    from ..server.images import ImagePolicy
    from ..vision.files import has_vision

    images = ImagePolicy(enabled=has_vision(loaded.model), allow_local=allow_local_images,
                         allow_remote=allow_remote_images, max_images=max_images, max_image_bytes=max_image_bytes)
    channel = None
    if parallel is not None:
        from ..distributed.serving import JobChannel

        channel = JobChannel(loaded.model.token_group)
    if not model_name:
        model_name = ("step35-mlx-demo" if model in (None, "demo")
                      else loaded.path.name if Path(model).expanduser().exists() else model)
    prefix_cache = open_prefix_cache(loaded.model, ram, disk, cache_dir, lambda text: typer.echo(text, err=True))
    try:
        app = create_app(loaded.model, loaded.tokenizer, model_name=model_name, api_key=api_key,
                         max_queue=max_queue, generation_config=loaded.generation_config,
                         max_body_bytes=max_body_bytes, images=images, max_context=loaded.context_limit,
                         channel=channel, prefix_cache=prefix_cache,
                         **({"mtp": mtp} if mtp is not None else {}))
    except ValueError as e:
        fail(str(e))
    if channel is not None and not channel.leader:
        from ..distributed.serving import follow

        return follow(app.state.engine, channel)  # rank 0 serves HTTP; this rank runs its generations
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    typer.echo(f"serving {loaded.path} as '{model_name}'")
    typer.echo(f"  OpenAI base URL:    {base}/v1")
    typer.echo(f"  Anthropic base URL: {base}")
    typer.echo(f"  health:             {base}/health" + ("" if api_key else "   (no API key required)"))
    if prefix_cache is not None:
        where = f", SSD {cache_disk} in {prefix_cache.disk.folder}" if prefix_cache.disk else ""
        typer.echo(f"  prefix cache:       RAM {cache_ram}{where}")
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        app.state.engine.close()
