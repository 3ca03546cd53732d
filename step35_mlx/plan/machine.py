"""What a machine offers the model: RAM and the GPU limit on macOS, Linux (and CUDA), else total RAM.

The functions that look at the machine (:func:`machine_memory`, :func:`set_wired_limit`) are
thin wrappers around pure ones that take the numbers as parameters (:func:`mac_machine`,
:func:`linux_machine`), so tests simulate any machine.

which MLX reports as ``max_recommended_working_set_size``; ``sudo sysctl
iogpu.wired_limit_mb=N`` raises it until reboot (0 = the default). Without Metal to ask,
the default is taken as 2/3 of RAM up to 32 GiB and 3/4 above (:func:`default_gpu_limit`):
the values llama.cpp's Metal backend logs on stock Macs -- 10,922.67 MiB on 16 GiB,
21,845.33 MiB on 32 GiB, 27 GiB on 36 GiB, 48 GiB on 64 GiB, 96 GiB on 128 GiB. Newer macOS
releases may allow more (107.52 GiB was measured on a 128 GiB Mac on macOS 26, reported in
antirez/ds4 #890 / #893), so the rule is conservative. Raising: we print ``N = RAM - 8
GiB`` (:data:`OS_RESERVE`), leaving 8 GiB for macOS and other apps.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .units import GiB, MiB

MAC_SIZES_GB = (64, 96, 128, 192, 256, 512)  # marketed sizes; the RAM is that many GiB
OS_RESERVE = 8 * GiB  # left to macOS when raising the GPU wired limit
SMALL_MAC = 32 * GiB  # up to this much RAM macOS lets the GPU wire 2/3, above it 3/4


@dataclass(frozen=True)
class MachineMemory:
    """``total``: physical RAM (or GPU memory on CUDA); ``gpu_limit``: what the model may use now."""

    total: int
    gpu_limit: int
    source: str
    kind: str = "mac"  # "mac", "cuda", "linux" or "other"
    name: str = "this machine"
    wired_limit_mb: int = 0  # iogpu.wired_limit_mb (0 = macOS default)

    @property
    def is_mac(self) -> bool:
        return self.kind == "mac"

    @property
    def raise_target(self) -> int | None:
        """The GPU limit after the suggested ``sysctl`` (macOS only): RAM minus :data:`OS_RESERVE`."""
        return self.total - OS_RESERVE if self.is_mac else None


def default_gpu_limit(total: int) -> int:
    """macOS's default GPU wired limit without Metal to ask: 2/3 of RAM up to 32 GiB, 3/4 above."""
    return total * 2 // 3 if total <= SMALL_MAC else total * 3 // 4


def mac_machine(ram_gib: float, *, wired_limit_mb: int = 0, recommended: int | None = None,
                name: str | None = None) -> MachineMemory:
    """A Mac with ``ram_gib`` GiB: Metal's recommended working set if given, else a set
    ``iogpu.wired_limit_mb``, else :func:`default_gpu_limit`."""
    total = int(ram_gib * GiB)
    if recommended:
        limit, source = int(recommended), "Metal's recommended working set"
    elif wired_limit_mb:
        limit, source = int(wired_limit_mb) * MiB, f"iogpu.wired_limit_mb={wired_limit_mb}"
    else:
        limit = default_gpu_limit(total)
        source = f"macOS default: {'2/3' if total <= SMALL_MAC else '3/4'} of RAM"
    return MachineMemory(total, limit, source, "mac", name or f"{ram_gib:g} GB Mac", int(wired_limit_mb))


def linux_machine(meminfo: str, *, cuda: dict | None = None, name: str = "this machine") -> MachineMemory:
    """From ``/proc/meminfo`` text; with ``cuda`` (an ``mx.device_info()`` dict) the GPU's memory."""
    fields = {}
    for line in meminfo.splitlines():
        m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
        if m:
            fields[m.group(1)] = int(m.group(2)) * 1024
    total = fields.get("MemTotal", 0)
    if cuda:
        dev_total = int(cuda.get("total_memory") or cuda.get("memory_size") or 0)
        free = cuda.get("free_memory")
        if dev_total:
            limit = int(free) if free else dev_total
            return MachineMemory(dev_total, limit, "CUDA device " + ("free memory" if free else "memory"),
                                 "cuda", name)
    available = fields.get("MemAvailable", total)
    return MachineMemory(total, available, "/proc/meminfo MemAvailable", "linux", name)


def _sysctl(key: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else None


def _device_info() -> dict:
    import mlx.core as mx

    fn = getattr(mx, "device_info", None) or getattr(mx.metal, "device_info", None)
    try:
        return dict(fn()) if fn else {}
    except Exception:  # noqa: BLE001 - no GPU device
        return {}


def _metal_available() -> bool:
    import mlx.core as mx

    try:
        return bool(mx.metal.is_available())
    except Exception:  # noqa: BLE001
        return False


def _cuda_available() -> bool:
    import mlx.core as mx

    try:
        return bool(getattr(mx, "cuda", None) and mx.cuda.is_available())
    except Exception:  # noqa: BLE001
        return False


def machine_memory() -> MachineMemory:
    """What this machine offers: macOS (sysctl + Metal), Linux (/proc/meminfo, CUDA), else total RAM."""
    if sys.platform == "darwin":
        total = int(_sysctl("hw.memsize") or 0)
        if not total:
            try:
                total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            except (ValueError, OSError, AttributeError):
                total = 0
        wired = int(_sysctl("iogpu.wired_limit_mb") or 0)
        rec = _device_info().get("max_recommended_working_set_size") if _metal_available() else None
        m = mac_machine(total / GiB, wired_limit_mb=wired, recommended=rec, name="this Mac")
        return m
    if sys.platform.startswith("linux"):
        try:
            meminfo = Path("/proc/meminfo").read_text()
        except OSError:
            meminfo = ""
        cuda = _device_info() if _cuda_available() else None
        return linux_machine(meminfo, cuda=cuda)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 0
    return MachineMemory(total, total, "physical RAM", "other")


def fused_attention_available() -> bool:
    """Whether float-KV attention runs MLX's fused kernel here (a GPU device), i.e. no score matrix."""
    import mlx.core as mx

    return mx.default_device() == mx.gpu


def set_wired_limit(nbytes: int) -> int | None:
    """On macOS with Metal, keep up to ``nbytes`` of MLX memory wired (capped at Metal's
    recommended working set, above which MLX raises); returns the previous limit. No-op
    (``None``) elsewhere."""
    import mlx.core as mx

    if sys.platform != "darwin" or not _metal_available():
        return None
    cap = _device_info().get("max_recommended_working_set_size")
    limit = int(min(nbytes, cap)) if cap else int(nbytes)
    fn = getattr(mx, "set_wired_limit", None) or mx.metal.set_wired_limit
    return fn(max(limit, 0))


def common_macs() -> list[MachineMemory]:
    return [mac_machine(gb) for gb in MAC_SIZES_GB]
