"""``step35-mlx bench``: prompt-processing and generation speed at several context depths.

Like ``llama-bench`` / ``mlx_lm.benchmark``: for each depth D the cache first holds D
context tokens (prefilled untimed), then a P-token prompt is timed to its first token
(``pp``, tokens/s) and the next N tokens are timed (``tg``, tokens/s; greedy, eos not
honoured), with each project's own generator: ours ``decode.ar_tokens`` (or MTP
``speculative_tokens``), mlx-lm ``generate_step``. Token ids are random (seeded), the same
for both. Repetitions of all engines are interleaved. Peak memory is each engine's own
weights plus MLX's peak over its run minus the memory in use before it. Medians and
[min-max] over the repetitions.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from .streams import usable_cores

GREEDY_NOTE = "greedy, eos ignored"


@dataclass
class MachineInfo:
    chip: str
    memory_gb: float
    cores: int
    mlx_version: str
    device: str
    usable_cores: int = 0  # cores this process may run on (taskset, cgroups); 0 = unknown

    def line(self) -> str:
        usable = f" ({self.usable_cores} usable)" if 0 < self.usable_cores < self.cores else ""
        return (f"{self.chip}, {self.memory_gb:.0f} GB RAM, {self.cores} cores{usable}; "
                f"MLX {self.mlx_version} on {self.device}")


def machine_info() -> MachineInfo:
    """The chip, memory and MLX build this run measures."""
    chip = platform.processor() or platform.machine()
    if platform.system() == "Darwin":
        try:
            chip = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                  text=True, timeout=5).stdout.strip() or chip
        except OSError:
            pass
    else:
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    chip = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        mem = 0.0
    return MachineInfo(chip, mem, os.cpu_count() or 0, mx.__version__, str(mx.default_device()), usable_cores())


@dataclass
class BenchSettings:
    prompt_tokens: int = 512
    gen_tokens: int = 128
    depths: list[int] = field(default_factory=lambda: [0])
    mtp: int = 0  # MTP draft depth; 0 = plain decoding
    repetitions: int = 3
    prefill_step: int = 512
    seed: int = 0
    streams: int = 1  # 2: our MoE decode split over two CPU streams (streams.use_two_streams)


@dataclass
class BenchRow:
    """One engine at one context depth (medians, [min, max] over repetitions)."""

    engine: str
    depth: int
    pp_tps: float
    pp_range: tuple[float, float]
    tg_tps: float
    tg_range: tuple[float, float]
    peak_gb: float
    acceptance: list[float] = field(default_factory=list)
    tokens_per_verify: float = 0.0


@dataclass
class Sample:
    pp_tps: float
    tg_tps: float
    peak_gb: float


def token_ids(vocab: int, n: int, seed: int) -> list[int]:
    """``n`` seeded random ids, avoiding the low ids where special tokens usually sit."""
    lo = min(16, vocab - 1)
    return mx.random.randint(lo, vocab, (n,), key=mx.random.key(seed)).tolist()


def _time(gen: Iterator[Any], prompt_tokens: int, gen_tokens: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    next(gen)
    t1 = time.perf_counter()
    for _ in range(gen_tokens):
        next(gen)
    t2 = time.perf_counter()
    gen.close()
    return prompt_tokens / (t1 - t0), gen_tokens / (t2 - t1)


@dataclass
class Engine:
    """One thing to measure: ``run(context ids, prompt ids)`` returns its token generator (cache prefilled with the context)."""

    name: str
    vocab: int
    weight_bytes: int
    run: Callable[[list[int], list[int]], Iterator[Any]]
    stats: Callable[[], dict] | None = None  # per-depth extra columns; called once per depth


def _row(engine: str, depth: int, samples: list[Sample], **extra: Any) -> BenchRow:
    pp = [s.pp_tps for s in samples]
    tg = [s.tg_tps for s in samples]
    return BenchRow(engine, depth, statistics.median(pp), (min(pp), max(pp)), statistics.median(tg),
                    (min(tg), max(tg)), max(s.peak_gb for s in samples), **extra)


def measure(engines: Sequence[Engine], settings: BenchSettings,
            progress: Callable[[str], None] | None = None) -> list[BenchRow]:
    """Every engine at every depth, repetitions interleaved (the order alternates) so load hits all alike.

    Peak memory of an engine = its own weights + (MLX peak over its run - active memory before it),
    so other engines loaded in the same process do not count.
    """
    for e in engines:  # compile and first-call costs, untimed
        _time(e.run([], token_ids(e.vocab, min(8, settings.prompt_tokens), settings.seed)), 1, 2)
        if e.stats:
            e.stats()
    rows = []
    for depth in settings.depths:
        samples: dict[str, list[Sample]] = {e.name: [] for e in engines}
        for r in range(settings.repetitions):
            for e in (engines if r % 2 == 0 else engines[::-1]):
                ctx = token_ids(e.vocab, depth, settings.seed + 1000 * r + 1)
                prompt = token_ids(e.vocab, settings.prompt_tokens, settings.seed + 1000 * r + 2)
                if progress:
                    progress(f"{e.name}: depth {depth}, repetition {r + 1}/{settings.repetitions}")
                gc.collect()
                mx.clear_cache()
                base = mx.get_active_memory()
                gen = e.run(ctx, prompt)
                mx.reset_peak_memory()
                pp, tg = _time(gen, settings.prompt_tokens, settings.gen_tokens)
                peak = e.weight_bytes + mx.get_peak_memory() - base
                samples[e.name].append(Sample(pp, tg, peak / 1e9))
        rows += [_row(e.name, depth, samples[e.name], **(e.stats() if e.stats else {})) for e in engines]
    order = {e.name: i for i, e in enumerate(engines)}
    return sorted(rows, key=lambda row: order[row.engine])


def _weight_bytes(model: Any) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def ours_engine(model: Any, settings: BenchSettings) -> Engine:
    """Our generators on ``model``: plain ``ar_tokens``, or MTP with ``settings.mtp`` drafts."""
    from .decode import ar_tokens, prefill
    from .draft_config import stored_gate
    from .draft_vocab import default_draft_ids
    from .sampling import SamplingParams
    from .speculative import SpecStats, speculative_tokens

    greedy = SamplingParams(temperature=0.0)
    spec = SpecStats(settings.mtp) if settings.mtp else None
    gate = stored_gate(model)  # as generation drafts

    def run(ctx: list[int], prompt: list[int]) -> Iterator[int]:
        cache = model.make_cache()
        if ctx:
            prefill(model, cache, mx.array(ctx, dtype=mx.int32), settings.prefill_step)
        p = mx.array(prompt, dtype=mx.int32)
        if spec is not None:
            return speculative_tokens(model, cache, p, greedy, depth=settings.mtp, stats=spec,
                                      history=ctx + prompt, prefill_step=settings.prefill_step,
                                      draft_vocab=default_draft_ids(model), min_confidence=gate)
        return ar_tokens(model, cache, p, greedy, prefill_step=settings.prefill_step)

    def stats() -> dict:
        """This depth's MTP statistics; the next depth starts fresh."""
        nonlocal spec
        if spec is None:
            return {}
        out = {"acceptance": spec.acceptance, "tokens_per_verify": spec.tokens_per_verify}
        spec = SpecStats(settings.mtp)
        return out

    name = "ours" + (f" mtp d={settings.mtp}" if settings.mtp else "")
    return Engine(name, model.config.vocab_size, _weight_bytes(model), run, stats if settings.mtp else None)


def mlx_lm_engine(path: Path, settings: BenchSettings) -> Engine:
    """mlx-lm's own model and ``generate_step`` on the same folder (plain decoding).

    On the CPU its floating weights are cast to float32, the activation dtype our loader uses there.
    """
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, config = load_model(Path(path))
    if mx.default_device() == mx.cpu:
        # as our loader does on the CPU: float32 activations (bf16 runs several times slower on MLX's CPU build)
        model.set_dtype(mx.float32)
    mx.eval(model.parameters())
    vocab = int(config.get("vocab_size") or model.args.vocab_size)

    def run(ctx: list[int], prompt: list[int]) -> Iterator[Any]:
        cache = make_prompt_cache(model)
        for i in range(0, len(ctx), settings.prefill_step):
            model(mx.array(ctx[i:i + settings.prefill_step])[None], cache=cache)
            mx.eval([c.state for c in cache])
        return generate_step(mx.array(prompt), model, max_tokens=settings.gen_tokens + 1,
                             sampler=lambda x: mx.argmax(x, axis=-1), prompt_cache=cache,
                             prefill_step_size=settings.prefill_step)

    return Engine("mlx-lm", vocab, _weight_bytes(model), run)


def ratios(ours: Sequence[BenchRow], theirs: Sequence[BenchRow]) -> list[dict]:
    """Per depth: ours / mlx-lm for pp and tg tokens/s (>1 is faster) and peak memory (<1 is smaller)."""
    by_depth = {r.depth: r for r in theirs}
    out = []
    for r in ours:
        t = by_depth.get(r.depth)
        if t is not None:
            out.append({"depth": r.depth, "pp": r.pp_tps / t.pp_tps, "tg": r.tg_tps / t.tg_tps,
                        "peak_memory": r.peak_gb / t.peak_gb if t.peak_gb else 0.0})
    return out


def report(machine: MachineInfo, model_desc: str, settings: BenchSettings, rows: Sequence[BenchRow],
           ratio_rows: Sequence[dict], floor_tps: float = 0.0) -> dict:
    """Everything of a run as one JSON-able dict."""
    return {"machine": asdict(machine), "model": model_desc, "settings": asdict(settings),
            "rows": [asdict(r) for r in rows], "ratios": list(ratio_rows), "floor_tps": floor_tps}


def table(machine: MachineInfo, model_desc: str, settings: BenchSettings, rows: Sequence[BenchRow],
          ratio_rows: Sequence[dict], floor_tps: float = 0.0) -> str:
    """The plain-text table a user pastes into an issue."""
    lines = [f"machine: {machine.line()}", f"model: {model_desc}",
             f"pp = {settings.prompt_tokens}-token prompt, tg = {settings.gen_tokens} tokens after it "
             f"({GREEDY_NOTE}); depth = context tokens already in the cache; median "
             f"[min-max] of {settings.repetitions}; ours on {settings.streams} CPU stream(s)",
             "", f"{'engine':<16} {'depth':>7} {'pp tok/s':>22} {'tg tok/s':>22} {'peak GB':>8}  MTP"]
    for r in rows:
        pp = f"{r.pp_tps:.1f} [{r.pp_range[0]:.1f}-{r.pp_range[1]:.1f}]"
        tg = f"{r.tg_tps:.2f} [{r.tg_range[0]:.2f}-{r.tg_range[1]:.2f}]"
        mtp = (f"accept {'/'.join(f'{a:.2f}' for a in r.acceptance)}, {r.tokens_per_verify:.2f} tok/verify"
               if r.acceptance else "-")
        lines.append(f"{r.engine:<16} {r.depth:>7} {pp:>22} {tg:>22} {r.peak_gb:>8.3f}  {mtp}")
    if floor_tps and rows:
        lines += ["", f"compute floor (the active weights' matmuls alone, one stream): {floor_tps:.2f} tok/s; "
                      f"ours tg at depth {rows[0].depth} takes {floor_tps / rows[0].tg_tps:.2f}x the floor's time"]
    if ratio_rows:
        lines += ["", f"{'ours / mlx-lm':<16} {'depth':>7} {'pp':>22} {'tg':>22} {'peak':>8}"]
        for q in ratio_rows:
            lines.append(f"{'':<16} {q['depth']:>7} {q['pp']:>21.2f}x {q['tg']:>21.2f}x {q['peak_memory']:>7.2f}x")
    return "\n".join(lines)
