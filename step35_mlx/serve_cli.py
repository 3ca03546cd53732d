"""``step35-mlx serve``: an OpenAI- and Anthropic-compatible HTTP server for one model."""

from __future__ import annotations

from typing import Optional

import typer


def serve(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model folder, Hugging Face repo id, or 'demo' (default: the bundled demo model)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8080, "--port", "-p", min=1, max=65535, help="Port to listen on."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="STEP35_API_KEY", help="Require this key ('Authorization: Bearer KEY' or 'x-api-key: KEY')."),
    max_queue: int = typer.Option(8, "--max-queue", min=0, help="Requests that may wait while one generates; more get 429."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id reported by /v1/models (default: the folder name)."),
    max_context: Optional[int] = typer.Option(None, "--max-context", help="Context limit in tokens (default: the model's)."),
    mtp: Optional[bool] = typer.Option(None, "--mtp/--no-mtp", help="Speculative decoding with the MTP heads (default: what `step35-mlx tune` chose, else off)."),
) -> None:
    """Serve a model over HTTP for OpenAI and Anthropic clients (Claude Code, opencode, SDKs).

    Example: step35-mlx serve --model ~/models/step35-q4 --port 8080 --api-key secret
    """
    try:
        import uvicorn

        from .server import create_app
    except ImportError as e:
        typer.secho(f"error: the server needs FastAPI and uvicorn ({e.name} is missing): "
                    "pip install 'step35-mlx[serve]'", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    from .chat_cli import _load

    m, tok, path, gen_config = _load(model, lambda text: typer.echo(text, err=True))
    if not model_name:
        from pathlib import Path

        model_name = ("step35-mlx-demo" if model in (None, "demo")
                      else path.name if Path(model).expanduser().exists() else model)
    defaults = {k: v for k, v in (("max_context", max_context), ("mtp", mtp)) if v is not None}
    try:
        app = create_app(m, tok, model_name=model_name, api_key=api_key, max_queue=max_queue,
                         generation_config=gen_config, **defaults)
    except ValueError as e:
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2)
    shown = "localhost" if host in ("0.0.0.0", "::") else host
    base = f"http://{shown}:{port}"
    typer.echo(f"serving {path} as '{model_name}'")
    typer.echo(f"  OpenAI base URL:    {base}/v1")
    typer.echo(f"  Anthropic base URL: {base}")
    typer.echo(f"  health:             {base}/health" + ("" if api_key else "   (no API key required)"))
    try:
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        app.state.engine.close()
