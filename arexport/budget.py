"""A memory budget checked before anything a user can size is allocated (batch rows, candidates,
images, cache length): an estimate over the budget raises MemoryBudgetError naming both, instead
of a kernel OOM kill or an allocator traceback later.

The budget is AREXPORT_MEMORY_BUDGET_GB when set; otherwise, on CPU, 90% of what the machine
(and its cgroup, in a container) has available now; on a CUDA device, 90% of its free memory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from arexport.errors import ArexportError

ENV = "AREXPORT_MEMORY_BUDGET_GB"
HEADROOM = 0.9  # of what is available: the process keeps running after the allocation


class MemoryBudgetError(ArexportError):
    """An allocation a user sized would exceed the memory budget."""


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 / 100 else f"{n / 2**20:.1f} MiB"


def _meminfo(key: str) -> Optional[int]:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> Optional[int]:
    """cgroup v2 limit minus usage (None without a limit)."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None


def available_bytes(device=None) -> int:
    """Bytes that can be allocated now on `device` (cpu when None)."""
    dev = str(device) if device is not None else "cpu"
    if dev.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(torch.device(dev))
        return int(free)
    found = [v for v in (_meminfo("MemAvailable"), _cgroup_available()) if v is not None]
    if not found:
        raise ArexportError(f"cannot tell how much memory is available here (no /proc/meminfo): set {ENV}")
    return max(0, min(found))


def budget_bytes(device=None) -> tuple[int, str]:
    """(budget in bytes, where it came from)."""
    env = os.environ.get(ENV)
    if env:
        try:
            gb = float(env)
        except ValueError:
            gb = float("nan")
        if not gb > 0 or gb == float("inf"):
            raise ArexportError(f"${ENV} must be a positive number of GiB, got {env!r}")
        return int(gb * 2**30), f"${ENV}"
    where = "free device memory" if str(device or "cpu").startswith("cuda") else "available memory"
    return int(available_bytes(device) * HEADROOM), f"{int(HEADROOM * 100)}% of {where}"


def check(what: str, estimate: int, device=None, hint: str = "") -> None:
    """Raise MemoryBudgetError when `estimate` bytes for `what` exceed the budget."""
    budget, source = budget_bytes(device)
    if estimate > budget:
        raise MemoryBudgetError(f"{what} needs an estimated {gib(estimate)}; the memory budget is {gib(budget)} ({source})"
                                + (f": {hint}" if hint else ""))


def kv_cache_bytes(spec, rows: int, slots: Optional[int] = None, itemsize: int = 4) -> int:
    """K and V buffers of `rows` rows: 2 x layers x rows x H_kv x slots x D x itemsize."""
    slots = spec.s_max if slots is None else slots
    return 2 * spec.n_cache_layers * rows * spec.n_kv_head * slots * spec.head_dim * itemsize


def image_bytes(spec, n: int) -> int:
    """uint8 RGB images of the model's output size."""
    return n * spec.image.image_size * spec.image.image_size * 3


def rss_bytes() -> int:
    """This process's resident set size (Linux /proc/self/statm)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
