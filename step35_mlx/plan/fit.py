"""The verdict for a plan on a machine (fits / raise the wired limit / no) and the changes that would make it fit."""

from __future__ import annotations

from dataclasses import dataclass

from .machine import OS_RESERVE, MachineMemory, machine_memory
from .memory_plan import MemoryPlan, largest_fitting, max_context
from .units import GB, GiB, MiB


class InsufficientMemoryError(ValueError):
    """The model does not fit; ``options`` lists changes that would make it fit (each checked)."""

    def __init__(self, message: str, plan: "MemoryPlan", machine: "MachineMemory", options: list["FitOption"]):
        super().__init__(message)
        self.plan = plan
        self.machine = machine
        self.options = options


@dataclass(frozen=True)
class Verdict:
    status: str  # "fits", "raise" (fits after raising the wired limit), "no"
    need: int
    limit: int
    raised_limit: int | None = None
    command: str | None = None

    @property
    def fits(self) -> bool:
        return self.status == "fits"


def sysctl_command(machine: MachineMemory) -> str:
    """``sudo sysctl iogpu.wired_limit_mb=N`` with N = RAM - 8 GiB, in MiB."""
    return f"sudo sysctl iogpu.wired_limit_mb={(machine.total - OS_RESERVE) // MiB}"


def verdict(need: int, machine: MachineMemory) -> Verdict:
    """fits (under the current GPU limit) / raise (a Mac, under RAM - 8 GiB) / no."""
    if need <= machine.gpu_limit:
        return Verdict("fits", need, machine.gpu_limit)
    target = machine.raise_target
    if target is not None and target > machine.gpu_limit and need <= target:
        return Verdict("raise", need, machine.gpu_limit, target, sysctl_command(machine))
    return Verdict("no", need, machine.gpu_limit, target)


@dataclass(frozen=True)
class FitOption:
    """One change that makes the plan fit: ``flag`` for the command line, ``changes`` for
    :meth:`MemoryPlan.replan` (``sysctl`` options change the machine instead: ``limit``)."""

    flag: str
    text: str
    changes: dict
    need: int
    limit: int | None = None  # the GPU limit this option assumes, when it changes the machine


def _fmt_gb(n: int) -> str:
    return f"{n / GB:.1f} GB"


def fit_options(plan: MemoryPlan, machine: MachineMemory) -> list[FitOption]:
    """Changes that would make ``plan`` fit ``machine``, each verified by recomputing the plan."""
    limit = machine.gpu_limit
    opts: list[FitOption] = []
    from ..quant.recipes import RECIPES

    current = plan.weights + plan.mtp_weights
    m = max_context(plan, limit)
    for name in RECIPES:
        try:
            p = plan.replan(recipe=name)
        except ValueError:
            continue
        if p.weights + p.mtp_weights >= current:
            continue
        size = _fmt_gb(p.weights + p.mtp_weights)
        if p.total <= limit:
            opts.append(FitOption(f"--recipe {name}", f"a {name} conversion ({size} of weights; needs "
                                  f"{_fmt_gb(p.total)}): step35-mlx convert --recipe {name}",
                                  {"recipe": name}, p.total))
        else:
            mr = max_context(p, limit)
            if mr > m:
                opts.append(FitOption(f"--recipe {name} --max-context {mr}",
                                      f"a {name} conversion ({size} of weights) with --max-context {mr}",
                                      {"recipe": name, "context": mr}, p.replan(context=mr).total))
    if 0 < m < plan.context:
        opts.append(FitOption(f"--max-context {m}", f"--max-context {m} (the longest context that fits)",
                              {"context": m}, plan.replan(context=m).total))
    kv_fits = False
    for bits in (8, 4):
        if plan.kv_bits is not None and bits >= plan.kv_bits:
            continue
        try:
            p = plan.replan(kv_bits=bits)
        except ValueError:  # a head dim the kv group size does not divide
            break
        if p.total <= limit:
            kv_fits = True
            opts.append(FitOption(f"--kv-bits {bits}", f"--kv-bits {bits} (full-layer KV {_fmt_gb(plan.full_kv)} "
                                  f"-> {_fmt_gb(p.full_kv)}; needs {_fmt_gb(p.total)})", {"kv_bits": bits}, p.total))
            break
    p4 = None
    if not kv_fits and plan.kv_bits != 4:
        try:
            p4 = plan.replan(kv_bits=4)
        except ValueError:
            p4 = None
    if p4 is not None:
        m4 = max_context(p4, limit)
        if m4 > m and m4 > 0:
            opts.append(FitOption(f"--kv-bits 4 --max-context {m4}", f"--kv-bits 4 --max-context {m4}",
                                  {"kv_bits": 4, "context": m4}, p4.replan(context=m4).total))
    if plan.mtp and plan.mtp_weights:
        p = plan.replan(mtp=False)
        if p.total <= limit:
            opts.append(FitOption("--no-mtp", f"--no-mtp (frees {_fmt_gb(plan.total - p.total)})",
                                  {"mtp": False}, p.total))
    if plan.prefill_step > 1 and plan.activations > 0.05 * plan.total:
        if plan.replan(prefill_step=1).total <= limit:  # the largest step in [1, prefill_step) that fits
            lo = largest_fitting(1, plan.prefill_step, lambda n: plan.replan(prefill_step=n).total <= limit)
            opts.append(FitOption(f"--prefill-step {lo}", f"--prefill-step {lo} (smaller prefill chunks; "
                                  f"activations {_fmt_gb(plan.activations)} -> "
                                  f"{_fmt_gb(plan.replan(prefill_step=lo).activations)})",
                                  {"prefill_step": lo}, plan.replan(prefill_step=lo).total))
    v = verdict(plan.total, machine)
    if v.status == "raise":
        opts.append(FitOption(v.command, f"raise the GPU wired limit to {_fmt_gb(v.raised_limit)} "
                              f"(until reboot; leaves {OS_RESERVE // GiB} GiB to macOS): {v.command}",
                              {}, plan.total, v.raised_limit))
    return opts


def check_fit(plan: MemoryPlan, machine: MachineMemory | None = None) -> None:
    """Return if ``plan`` fits ``machine`` (default: this one); else raise
    :class:`InsufficientMemoryError` listing the options that would make it fit."""
    machine = machine or machine_memory()
    if plan.total <= machine.gpu_limit:
        return
    opts = fit_options(plan, machine)
    head = (f"{plan.recipe} with {plan.context:,} tokens of context (KV {plan.kv_label}, MTP "
            f"{'on' if plan.mtp else 'off'}) needs {_fmt_gb(plan.total)}, but {machine.name} can give it "
            f"{_fmt_gb(machine.gpu_limit)} ({machine.source}).")
    if opts:
        body = "\nAny one of these would make it fit:\n" + "\n".join(f"  - {o.text}" for o in opts)
    else:
        body = (f"\nNothing fits: the smallest recipe's weights alone are too large for "
                f"{_fmt_gb(machine.gpu_limit)}.")
    raise InsufficientMemoryError(head + body, plan, machine, opts)
