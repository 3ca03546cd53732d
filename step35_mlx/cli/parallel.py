"""``--parallel`` for the commands that run a model, and ``plan --hosts``: the CLI side of step35_mlx.distributed."""

from __future__ import annotations

import os
import sys
from typing import Callable, Optional

import typer

from .common import fail
from .loading import LoadedModel

PARALLEL_OPTION = typer.Option(None, "--parallel", help="Split the model across the ranks started by mlx.launch: "
                               "tensor, expert or pipeline (README: Several Macs).")
SPLIT_OPTION = typer.Option(None, "--split", help="--parallel pipeline: trunk layers per rank, e.g. 30,15 "
                            "(default auto: in proportion to each rank's memory).")


def load_parallel_for_cli(model: Optional[str], announce: Callable[[str], None], mode: str, split: Optional[str],
                          *, mtp: bool, max_context: Optional[int] = None, kv_bits: Optional[int] = None) -> LoadedModel:
    """This rank's share of ``model``; ranks other than 0 print nothing on stdout."""
    from ..distributed.runtime import ParallelSetupError, load_rank
    from ..hub import DEMO_DIR, resolve_model
    from ..settings import read_generation_config

    def locate():
        path = resolve_model(model)
        if model is None:
            announce(f"No --model given: using the bundled demo model ({DEMO_DIR}). "
                     "Pass --model PATH|REPO to chat with Step 3.5 Flash.")
        return path

    try:
        rank = load_rank(locate, mode, split, mtp=mtp, max_context=max_context, kv_bits=kv_bits)
        from mlx_lm.tokenizer_utils import load as load_tokenizer  # after the checks: a refused rank exits fast

        tokenizer = load_tokenizer(rank.path, eos_token_ids=rank.config.eos_token_id or None)
        generation_config = read_generation_config(rank.path, warn=announce)
    except ParallelSetupError as e:
        fail(str(e))
    except (ValueError, OSError) as e:
        fail(f"cannot load {rank.path}: {e}")
    if rank.group.rank() != 0:
        sys.stdout = open(os.devnull, "w")
    if max_context is None and rank.context_limit < rank.config.max_position_embeddings:
        announce(f"Context limited to {rank.context_limit:,} tokens so that every rank's share fits its memory "
                 "(`step35-mlx plan --hosts ...` shows the options).")
    return LoadedModel(rank.model, tokenizer, rank.path, generation_config, rank.context_limit)


def print_hosts_plan(config, hosts: str, recipe: Optional[str], context: int) -> None:
    """``plan --hosts``: per-rank memory for each mode and recipe, the verdicts and the launch lines."""
    from ..distributed.hostplan import launch_line, parse_hosts, plan_hosts, release_tensor_problems
    from ..plan import verdict

    try:
        sizes = parse_hosts(hosts)
    except ValueError as e:
        fail(str(e))
    recipes = [recipe] if recipe else ["q8", "q6", "q4", "q3-mixed", "q2-mixed"]
    typer.echo(f"{len(sizes)} Macs: {', '.join(f'{s:g} GB' for s in sizes)}; context {context:,} tokens; "
               "per rank GB = weights + KV + activations/overhead")
    for r in recipes:
        problems = release_tensor_problems(config, r, len(sizes))
        for p in plan_hosts(config, sizes, recipe=r, context=context, tensor_problems=problems):
            cells = []
            for need in p.ranks:
                v = verdict(need.total, need.host)
                cells.append(f"{need.total / 1e9:6.1f}{'' if v.status == 'fits' else '*' if v.status == 'raise' else '!'}")
            status = "no: " + p.problem if p.problem else ("fits" if p.fits else "does not fit")
            split = f" split {','.join(map(str, p.counts))}" if p.counts else ""
            typer.echo(f"  {r:9s} {p.mode:9s} {' '.join(cells)}   {status}{split}")
            if p.fits:
                typer.echo(f"      {launch_line(p.mode, p.counts, f'~/models/step35-{r}')}")
    typer.echo("(* = after raising the GPU wired limit on that Mac: sudo sysctl iogpu.wired_limit_mb=<RAM minus 8 GB>; "
               "! = does not fit that Mac)")


def chat_across_ranks(session, group, converse: Callable) -> None:
    """Rank 0 converses with the terminal through a ``LeaderSession``; the other ranks follow it."""
    from ..distributed.serving import JobChannel, LeaderSession, follow_chat

    channel = JobChannel(group)
    if not channel.leader:
        return follow_chat(session, channel)
    leader = LeaderSession(session, channel)
    typer.secho(f"step35-mlx chat · {group.size()} ranks · context limit {session.context_limit} tokens", bold=True)
    typer.secho("Type a message. /help lists commands; Ctrl-C stops an answer; Ctrl-D exits.", dim=True)
    try:
        converse(leader)
    finally:
        leader.close()
