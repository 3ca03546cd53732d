"""Memory planner: what Step 3.5 Flash needs for a recipe, a context length and a KV format,
what this machine (or a common Mac) offers, and what to change when it does not fit.

Everything here is arithmetic on a config and a few numbers; nothing is loaded. Modules:
:mod:`.weights` (weight bytes), :mod:`.kv` and :mod:`.activations` (caches and transients),
:mod:`.memory_plan` (:class:`MemoryPlan`, :func:`plan_memory`, :func:`max_context`; every part
of a plan is described there), :mod:`.machine` (what the machine offers), :mod:`.fit` (the
verdict and the changes that make a plan fit), :mod:`.load_check` (:func:`preflight`, the
check before loading) and :mod:`.units` (units and the command line's parsers). The names
below are importable from here.
"""

from .activations import activation_bytes
from .fit import FitOption, InsufficientMemoryError, Verdict, check_fit, fit_options, sysctl_command, verdict
from .kv import kv_token_bytes
from .load_check import MIN_CONTEXT, preflight
from .machine import (MAC_SIZES_GB, OS_RESERVE, MachineMemory, common_macs, default_gpu_limit,
                      fused_attention_available, linux_machine, mac_machine, machine_memory, set_wired_limit)
from .memory_plan import OVERHEAD, MemoryPlan, max_context, plan_memory
from .units import GB, GiB, MiB, format_tokens, parse_kv_bits, parse_tokens
from .weights import WeightSizes, folder_activation_bytes, folder_weight_sizes, load_dtype_bytes, weight_sizes

__all__ = [
    "GB", "GiB", "MiB", "MAC_SIZES_GB", "OS_RESERVE", "OVERHEAD", "InsufficientMemoryError", "WeightSizes",
    "weight_sizes", "folder_weight_sizes", "folder_activation_bytes", "kv_token_bytes", "activation_bytes",
    "MemoryPlan", "plan_memory", "max_context", "MachineMemory", "default_gpu_limit", "mac_machine",
    "linux_machine", "machine_memory", "fused_attention_available", "set_wired_limit", "Verdict", "verdict",
    "sysctl_command", "common_macs", "FitOption", "fit_options", "check_fit", "parse_tokens", "format_tokens",
    "parse_kv_bits", "preflight", "MIN_CONTEXT", "load_dtype_bytes",
]
