"""gpumem as PyTorch's CUDA allocator.

Call :func:`enable` once, right after ``import torch`` and before anything initializes CUDA
(the first CUDA tensor, ``torch.cuda.set_device``, ``init_process_group``)::

    import torch
    import gpumem.torch
    gpumem.torch.enable()             # policy="gpumem"; or policy="torch", or options
    x = torch.randn(10000, 10000, device="cuda")
    print(torch.cuda.memory_summary())

From then on every CUDA tensor's memory comes from gpumem, and PyTorch's memory functions
report gpumem's figures: ``torch.cuda.memory_allocated``, ``memory_reserved`` and their
``max_`` forms, ``reset_peak_memory_stats``, ``memory_stats``, ``memory_summary``,
``memory_snapshot``, ``_record_memory_history``, ``_dump_snapshot``, ``empty_cache``,
``set_per_process_memory_fraction``, ``Tensor.record_stream``, ``mem_get_info``, and the same
under ``torch.accelerator``. PyTorch's pluggable-allocator interface has no hooks for the
stats, so :func:`enable` replaces the private ``torch._C`` functions behind them
(:func:`unpatch` puts them back); C++ callers of those functions are not covered.

What cannot work under a pluggable allocator fails with a message that names gpumem:
``torch.cuda.MemPool``, CUDA graph capture (and with it
``torch.compile(mode="reduce-overhead")``), ``torch.backends.cudnn.benchmark = True`` and
sending CUDA tensors to other processes (CUDA IPC).
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any, Iterator

import torch

from gpumem import _gpumem, _torch_patch
from gpumem._torch_patch import device_index as _device_index

__all__ = [
    "enable",
    "is_enabled",
    "policy",
    "unpatch",
    "allocator",
    "memory_stats",
    "snapshot",
    "record_history",
    "leaks",
    "track",
    "Tracked",
]

_MALLOC = "gpumem_torch_malloc"
_FREE = "gpumem_torch_free"

_state: dict[str, Any] = {}
_originals: dict[tuple[Any, str], Any] = {}


def _options(policy: str, options: dict[str, Any]) -> str:
    """The policy string with options in PyTorch's syntax: ``torch:max_split_size_mb:128``."""
    parts = []
    for key, value in options.items():
        if isinstance(value, bool):
            value = "True" if value else "False"
        parts.append(f"{key}:{value}")
    return policy if not parts else f"{policy}:{','.join(parts)}"


def is_enabled() -> bool:
    """Whether :func:`enable` installed gpumem in this process."""
    return "allocator" in _state


def policy() -> str | None:
    """The policy string :func:`enable` installed, or None."""
    return _state.get("policy")


def enable(policy: str = "gpumem", *, patch: bool = True, **options: Any) -> None:
    """Makes gpumem PyTorch's CUDA allocator, with ``policy`` (``"gpumem"``, ``"torch"``,
    ``"torch-expandable"``) and ``options`` in PyTorch's ``PYTORCH_CUDA_ALLOC_CONF`` names
    (``max_split_size_mb=128``, ``garbage_collection_threshold=0.8``, ...).

    Call it once, before CUDA is initialized; calling it again with the same policy does
    nothing. ``patch`` (default True) makes ``torch.cuda``'s and ``torch.accelerator``'s
    memory functions report gpumem's figures.

    Raises ``RuntimeError`` if CUDA is initialized already (PyTorch's own allocator is then
    in use and cannot be swapped), or if another allocator (RMM, say) is installed.
    """
    wanted = _options(policy, options)
    if is_enabled():
        if wanted != _state["policy"]:
            raise RuntimeError(
                f"gpumem.torch.enable({wanted!r}): gpumem is already enabled with {_state['policy']!r}, "
                "and an allocator that holds PyTorch's memory cannot change its policy; call enable() once"
            )
        return
    if torch.cuda.is_initialized():
        raise RuntimeError(
            "gpumem.torch.enable() must be called before CUDA is initialized, and it already is, with "
            "PyTorch's own allocator in use: call enable() right after `import torch`, before the first "
            "CUDA tensor, torch.cuda.set_device(), torch.cuda.mem_get_info() or init_process_group()"
        )
    current = torch.cuda.memory._get_current_allocator()
    if current.allocator() is not None:
        raise RuntimeError(
            "gpumem.torch.enable(): another CUDA allocator is already installed in PyTorch "
            "(torch.cuda.memory.change_current_allocator was called, by RMM or another library); "
            "only one can be, so enable gpumem instead of it, not after it"
        )
    _gpumem._plugin_configure(wanted, "cuda", None)
    path = _gpumem.__file__
    alloc = torch.cuda.memory.CUDAPluggableAllocator(path, _MALLOC, _FREE)
    lib = ctypes.CDLL(path)
    hooks = alloc.allocator()

    def address(name: str) -> int:
        return ctypes.cast(getattr(lib, name), ctypes.c_void_p).value

    hooks.set_init_fn(address("gpumem_torch_init"))
    hooks.set_reset_fn(address("gpumem_torch_empty_cache"))
    hooks.set_memory_fraction_fn(address("gpumem_torch_set_fraction"))
    hooks.set_base_alloc_fn(address("gpumem_torch_base_alloc"))
    hooks.set_record_stream_fn(address("gpumem_torch_record_stream"))
    # CUDA graph capture: gpumem has no private pools for graphs yet, so its begin hook
    # refuses capture with a message saying so. Without the hook, capture would run and
    # take memory from the shared cache, which replays would then share with other work.
    if hasattr(hooks, "set_begin_allocate_to_pool"):
        hooks.set_begin_allocate_to_pool(address("gpumem_torch_begin_pool"))
        hooks.set_end_allocate_to_pool_fn(address("gpumem_torch_end_pool"))
        hooks.set_release_pool(address("gpumem_torch_release_pool"))
    elif hasattr(hooks, "set_begin_allocate_stream_to_pool"):
        hooks.set_begin_allocate_stream_to_pool(address("gpumem_torch_begin_pool"))
        hooks.set_end_allocate_stream_to_pool_fn(address("gpumem_torch_end_pool"))
    torch.cuda.memory.change_current_allocator(alloc)
    # keep the allocator and the library alive as long as the process: PyTorch holds raw
    # function pointers into it
    _state.update(allocator=alloc, lib=lib, policy=wanted)
    if patch:
        _torch_patch.apply(_originals)


def unpatch() -> None:
    """Puts back the ``torch`` functions :func:`enable` replaced (gpumem stays the allocator;
    PyTorch's stats functions then raise, as they do under any pluggable allocator)."""
    for (owner, name), original in list(_originals.items()):
        setattr(owner, name, original)
    _originals.clear()


def allocator(device: int | None = None) -> _gpumem.Allocator | None:
    """The gpumem allocator behind ``device`` (the current device by default), or None if
    nothing was allocated on it yet."""
    return _gpumem._plugin_allocator(_device_index(device))


def memory_stats(device: int | None = None) -> dict[str, int]:
    """gpumem's counters for ``device`` under PyTorch's ``memory_stats()`` names (every key
    at 0 before the first allocation)."""
    return _torch_patch.flat_stats(_device_index(device))


def snapshot() -> dict:
    """PyTorch's snapshot dict (``torch.cuda.memory._snapshot()``) of every device."""
    return _gpumem._plugin_snapshot()


def record_history(enabled: bool = True, max_entries: int = 1_000_000, stacks: bool = True) -> None:
    """Starts recording every allocation, free and segment change on every device (with
    each allocation's Python stack if ``stacks``), or stops and forgets them."""
    _gpumem._plugin_record_history(enabled, max_entries, stacks)


def leaks(device: int | None = None) -> _gpumem.LeakReport | None:
    """What is live now on ``device``, grouped by the Python line that allocated it, largest
    first; ``print()`` it for the table. Sites need history with stacks
    (:func:`record_history`, or ``torch.cuda.memory._record_memory_history()``); blocks
    allocated without it share one site with no frames. None before the first allocation."""
    a = allocator(device)
    return a.leaks() if a is not None else None


class Tracked:
    """What a :func:`track` block allocated and still holds at its end, by allocation
    site. ``print(t)`` gives the table; ``t.count``, ``t.bytes`` and ``t.sites`` the data."""

    def __init__(self) -> None:
        self.report: _gpumem.LeakReport | None = None

    @property
    def count(self) -> int:
        return self.report.count if self.report is not None else 0

    @property
    def bytes(self) -> int:
        return self.report.bytes if self.report is not None else 0

    @property
    def sites(self) -> list[dict]:
        return self.report.sites if self.report is not None else []

    def __str__(self) -> str:
        if self.report is None:
            return "gpumem.torch.track(): still tracking (the report comes at the end of the with block)"
        if self.report.count == 0:
            return "gpumem.torch.track(): nothing allocated inside the block is still live"
        return str(self.report)

    def __repr__(self) -> str:
        return f"<gpumem.torch.Tracked: {self.count} live block(s), {self.bytes} bytes>"


@contextlib.contextmanager
def track(device: int | None = None) -> Iterator[Tracked]:
    """Reports what the ``with`` block allocated on ``device`` and still holds at its end,
    by the Python line that allocated it::

        with gpumem.torch.track() as t:
            loss = step(model, batch)
        print(t)          # the blocks still live, by site, largest first

    History is recorded with stacks inside the block if it was not on already (and turned
    off again after). Needs :func:`enable`.
    """
    if not is_enabled():
        raise RuntimeError("gpumem.torch.track() needs gpumem as PyTorch's allocator: call gpumem.torch.enable() first")
    a = _gpumem._plugin_allocator_for(_device_index(device))
    started = _gpumem._plugin_history() is None
    if started:
        record_history(True)
    t = Tracked()
    mark = a.allocation_mark()
    try:
        yield t
    finally:
        t.report = a.leaks_since(mark)
        if started:
            record_history(False)
