"""PyTorch's memory functions, answered by gpumem.

Note [Why patch torch._C]
-------------------------
Under a pluggable allocator PyTorch's stats functions raise ("CUDAPluggableAllocator does not
yet support getDeviceStats") or report zeros: its C++ has no hook to ask the plugin. The
Python functions of ``torch.cuda.memory`` and ``torch.accelerator.memory`` look up their
``torch._C`` function at each call, so replacing those few functions makes every Python caller
(``torch.cuda.memory_allocated``, ``memory_summary``, libraries that log memory) get gpumem's
figures, whatever name they imported. The replacements take ``*args``: these are private
functions whose signatures change between PyTorch versions.

What cannot work under a pluggable allocator is made to fail with a message naming gpumem
rather than PyTorch's generic one (or silently wrong behaviour).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from gpumem import _gpumem


def device_index(device: Any) -> int:
    """The index of ``device`` (an int, a ``torch.device``, a string), or of the current device
    for None or a negative index; 0 before CUDA is initialized, so that asking for stats
    never initializes it."""
    if device is None or (isinstance(device, int) and device < 0):
        return torch.cuda.current_device() if torch.cuda.is_initialized() else 0
    if isinstance(device, int):
        return device
    return torch.device(device).index or 0


def _device(args: tuple, kwargs: dict) -> int:
    return device_index(args[0] if args else kwargs.get("device"))


def flat_stats(device: int) -> dict[str, int]:
    """gpumem's counters for ``device`` under PyTorch's ``memory_stats()`` names (every key at
    0 before the device's first allocation)."""
    a = _gpumem._plugin_allocator(device)
    return a.memory_stats() if a is not None else _gpumem._empty_stats()


def _nested(flat: dict[str, int]) -> dict[str, Any]:
    """``{"allocated_bytes.all.current": 5}`` -> ``{"allocated_bytes": {"all": {"current": 5}}}``,
    the shape ``torch._C._cuda_memoryStats`` returns."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def _stats(*args: Any, **kwargs: Any) -> dict[str, Any]:
    return _nested(flat_stats(_device(args, kwargs)))


def _reset_peak(*args: Any, **kwargs: Any) -> None:
    a = _gpumem._plugin_allocator(_device(args, kwargs))
    if a is not None:
        a.reset_peak_memory_stats()


def _reset_accumulated(*args: Any, **kwargs: Any) -> None:
    a = _gpumem._plugin_allocator(_device(args, kwargs))
    if a is not None:
        a.reset_accumulated_memory_stats()


# actions `_record_memory_history(skip_actions=[...])` asked to leave out of the traces
_skipped_actions: set[str] = set()


def _snapshot(*args: Any, **kwargs: Any) -> dict:
    snap = _gpumem._plugin_snapshot()
    if _skipped_actions:
        snap["device_traces"] = [
            [e for e in trace if e["action"] not in _skipped_actions] for trace in snap["device_traces"]
        ]
    return snap


_STACK_KINDS = ("python", "all")


def _record_history(*args: Any, **kwargs: Any) -> None:
    """``torch._C._cuda_record_memory_history(enabled, context, stacks, max_entries, ...)``:
    ``enabled`` None stops; ``stacks`` "python" or "all" keeps Python frames ("cpp" has none
    here: gpumem records no C++ frames)."""
    names = ("enabled", "context", "stacks", "max_entries", "clear_history", "compile_context",
             "global_record_annotations", "skip_actions")
    given = dict(zip(names, args))
    given.update({k: v for k, v in kwargs.items() if k in names})
    _skipped_actions.clear()
    _skipped_actions.update(given.get("skip_actions") or ())
    enabled = given.get("enabled")
    if enabled is None or enabled is False:
        _gpumem._plugin_record_history(False)
        return
    context = given.get("context", "all")
    stacks = given.get("stacks", "all")
    max_entries = int(given.get("max_entries") or 1_000_000)
    keep = context is not None and stacks in _STACK_KINDS
    _gpumem._plugin_record_history(True, max_entries, keep)


def _record_history_legacy(*args: Any, **kwargs: Any) -> None:
    """The old form: ``(enabled: bool, record_context, trace_alloc_max_entries, ...)``."""
    enabled = args[0] if args else kwargs.get("enabled", False)
    if not enabled:
        _gpumem._plugin_record_history(False)
        return
    record_context = args[1] if len(args) > 1 else kwargs.get("record_context", True)
    max_entries = args[2] if len(args) > 2 else kwargs.get("trace_alloc_max_entries", 1)
    _gpumem._plugin_record_history(True, max(int(max_entries or 1), 1), bool(record_context))


def _memory_fraction(*args: Any, **kwargs: Any) -> float:
    a = _gpumem._plugin_allocator(_device(args, kwargs))
    return a.per_process_memory_fraction() if a is not None else 1.0


def _initialized(*args: Any, **kwargs: Any) -> bool:
    return torch.cuda.is_initialized()


def _accelerator_empty_cache(*args: Any, **kwargs: Any) -> None:
    torch.cuda.empty_cache()


def _refuse(what: str, why: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"gpumem: {what} does not work while gpumem is PyTorch's allocator: {why}")

    return refuse


def _cudnn_benchmark_setter(original: Callable[[bool], None]) -> Callable[[bool], None]:
    def set_benchmark(flag: bool) -> None:
        if flag:
            raise RuntimeError(
                "gpumem: torch.backends.cudnn.benchmark = True does not work while gpumem is PyTorch's "
                "allocator: cuDNN's benchmark asks the allocator for its largest free block "
                "(cacheInfo), which PyTorch's pluggable-allocator interface cannot forward; "
                "leave cudnn.benchmark False (the default)"
            )
        original(flag)

    return set_benchmark


def apply(originals: dict) -> None:
    """Replaces the functions, remembering each original in ``originals`` once."""

    def put(owner: Any, name: str, new: Any) -> None:
        if not hasattr(owner, name):
            return  # not in this PyTorch version
        if (owner, name) not in originals:
            originals[(owner, name)] = getattr(owner, name)
        setattr(owner, name, new)

    C = torch._C
    put(C, "_cuda_memoryStats", _stats)
    put(C, "_cuda_resetPeakMemoryStats", _reset_peak)
    put(C, "_cuda_resetAccumulatedMemoryStats", _reset_accumulated)
    put(C, "_cuda_memorySnapshot", _snapshot)
    put(C, "_cuda_record_memory_history", _record_history)
    put(C, "_cuda_record_memory_history_legacy", _record_history_legacy)
    put(C, "_cuda_getMemoryFraction", _memory_fraction)
    # torch.accelerator asks the device-generic allocator registry, which the swap does not
    # update: without these it reports zeros for a CUDA program under any plugin.
    if getattr(torch.accelerator, "current_accelerator", lambda: None)() is not None and (
        torch.accelerator.current_accelerator().type == "cuda"
    ):
        put(C, "_accelerator_getDeviceStats", _stats)
        put(C, "_accelerator_resetPeakStats", _reset_peak)
        put(C, "_accelerator_resetAccumulatedStats", _reset_accumulated)
        put(C, "_accelerator_isAllocatorInitialized", _initialized)
        put(C, "_accelerator_emptyCache", _accelerator_empty_cache)
    cudnn_set = originals.get((C, "_set_cudnn_benchmark"), getattr(C, "_set_cudnn_benchmark", None))
    if cudnn_set is not None:
        put(C, "_set_cudnn_benchmark", _cudnn_benchmark_setter(cudnn_set))
        cudnn = type(torch.backends.cudnn)
        # from the class's dict: reading the attribute would call the property
        prop = cudnn.__dict__.get("benchmark")
        if prop is not None and hasattr(prop, "getter"):
            put(cudnn, "benchmark", type(prop)(prop.getter, _cudnn_benchmark_setter(cudnn_set)))
    put(
        torch.cuda.memory.MemPool,
        "__init__",
        _refuse(
            "torch.cuda.MemPool",
            "memory pools are made by PyTorch's own allocator (createOrIncrefPool), which PyTorch's "
            "pluggable-allocator interface does not forward; run without gpumem to use MemPool",
        ),
    )
    put(
        torch.UntypedStorage,
        "_share_cuda_",
        _refuse(
            "sending a CUDA tensor to another process (CUDA IPC)",
            "PyTorch's pluggable-allocator interface has no IPC hooks; send CPU tensors, or "
            "let each process allocate its own",
        ),
    )
