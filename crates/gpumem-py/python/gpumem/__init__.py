"""gpumem: a GPU caching memory allocator, from Python.

- ``gpumem.Allocator``: an allocator over a simulated GPU (``device="sim"``, no GPU needed)
  or a real one (``device="cuda"``), with PyTorch's stats, summary and snapshots.
- ``gpumem.replay``: a recorded allocation trace through any policy, without a GPU.
- ``gpumem.torch.enable()``: gpumem as PyTorch's CUDA allocator (``import gpumem.torch``).

The policies: ``"gpumem"`` (the default: reserves within about 2% of the live bytes),
``"torch"`` (PyTorch's own algorithm, exactly) and ``"torch-expandable"`` (PyTorch's with
``expandable_segments:True``).

>>> import gpumem
>>> a = gpumem.Allocator(policy="torch", device="sim")
>>> p = a.malloc((1 << 20) + 1)
>>> a.memory_reserved()      # 1-10 MiB requests share 20 MiB segments
20971520
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence, Union

from gpumem._gpumem import (
    POLICIES,
    Allocator,
    GpumemError,
    LeakReport,
    OutOfMemoryError,
    __version__,
    driver_present,
)
from gpumem import _gpumem

__all__ = [
    "Allocator",
    "GpumemError",
    "LeakReport",
    "OutOfMemoryError",
    "POLICIES",
    "__version__",
    "driver_present",
    "replay",
]

PathLike = Union[str, "os.PathLike[str]"]


def replay(
    paths: Union[PathLike, Iterable[PathLike]],
    policies: Union[str, Sequence[str], None] = None,
    *,
    capacity: int | None = None,
    verify: bool = False,
) -> list[dict]:
    """Replays allocation traces through policies on the simulated device.

    ``paths``: one trace or several (gpumem's JSON lines, plain or gzip'd; PyTorch snapshot
    pickles; RMM logs). ``policies``: names as ``gpumem replay --policy`` takes them
    (``"torch:max_split_size_mb:128"``); all three by default. ``capacity``: the simulated
    GPU's bytes (80 GiB by default). ``verify``: check the ``torch`` policy against the
    decisions PyTorch recorded in the trace.

    Returns one dict per (trace, policy) with the fields of ``gpumem replay --json``:
    ``peak_requested``, ``peak_reserved``, ``reserved_ratio``, ``ooms``, ...
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    if isinstance(policies, str):
        policies = [policies]
    names = [os.fspath(p) for p in paths]
    rows = _gpumem._replay(names, list(policies) if policies is not None else None, capacity, verify)
    return [json.loads(r) for r in rows]
