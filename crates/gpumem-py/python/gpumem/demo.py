"""The walk-through of ``python -m gpumem demo``: how PyTorch's memory calls behave, with
gpumem as the allocator: a 400 MB tensor, ``del``, ``empty_cache()``, and the driver's
free memory back where it began."""

from __future__ import annotations

import sys

MIB = 1 << 20


def _mb(b: int) -> str:
    return f"{b / 1e6:.2f} MB = {b / MIB:.2f} MiB"


def _why_no_gpu() -> str | None:
    """Why the walk-through cannot run inside PyTorch on a GPU here, or None if it can."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "torch sees no GPU"
    return None


def _walk(name: str, allocated, reserved, driver_free, make_x, empty_cache) -> int:
    def show() -> None:
        print(f"   memory_allocated() = {_mb(allocated())}")
        print(f"   memory_reserved()  = {_mb(reserved())}")
        print(f"   driver free memory = {_mb(driver_free())}")

    print(f"How to clear GPU memory, on the {name}\n")
    free0 = driver_free()
    print(f"0. Before anything: driver free memory = {_mb(free0)}\n")
    print("1. x = torch.randn(10000, 10000, device='cuda')")
    x = make_x()
    show()
    print("\n2. torch.cuda.empty_cache() while x is alive: the pitfall, nothing is freed")
    empty_cache()
    show()
    print("\n3. del x: the tensor is gone, but its memory stays cached for the next tensor")
    del x
    show()
    print("\n4. torch.cuda.empty_cache(): the cached memory goes back to the GPU")
    empty_cache()
    show()
    free4 = driver_free()
    where = "back where it began" if free4 == free0 else "NOT back where it began"
    print(f"   driver free memory is {where} ({free0} before, {free4} now)")
    return 0 if free4 == free0 and reserved() == 0 else 1


def _on_torch(policy: str) -> int:
    import torch

    import gpumem.torch as gt

    gt.enable(policy=policy)
    dev = torch.device("cuda", 0)
    # CUDA, cuBLAS and cuRAND take memory of their own when first used; start counting after.
    torch.randn(2, device=dev)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    name = f"GPU 0 ({torch.cuda.get_device_name(0)}), inside PyTorch {torch.__version__}, policy {policy}"
    return _walk(
        name,
        lambda: torch.cuda.memory_allocated(dev),
        lambda: torch.cuda.memory_reserved(dev),
        lambda: torch.cuda.mem_get_info(dev)[0],
        lambda: torch.randn(10000, 10000, device=dev),
        torch.cuda.empty_cache,
    )


class _Block:
    """A block of the simulated device that frees itself when deleted, like a tensor."""

    def __init__(self, alloc, size: int) -> None:
        self.alloc, self.ptr = alloc, alloc.malloc(size)

    def __del__(self) -> None:
        if self.ptr:
            self.alloc.free(self.ptr)
            self.ptr = 0


def _on_sim(policy: str) -> int:
    import gpumem

    a = gpumem.Allocator(policy=policy, device="sim")
    return _walk(
        f"simulated GPU (80 GiB; no real memory is touched), policy {policy}",
        a.memory_allocated,
        a.memory_reserved,
        lambda: a.mem_get_info()[0],
        lambda: _Block(a, 10000 * 10000 * 4),
        a.empty_cache,
    )


def run(device: str = "auto", policy: str = "gpumem") -> int:
    """Runs the walk-through; returns the exit status (0: reserved 0 and the driver's free
    memory back at the end)."""
    if device == "sim":
        return _on_sim(policy)
    why = _why_no_gpu()
    if why is None:
        return _on_torch(policy)
    if device == "cuda":
        print(f"gpumem demo: no GPU to run on: {why}", file=sys.stderr)
        return 1
    print(f"gpumem demo: {why}: running on the simulated device instead\n")
    return _on_sim(policy)
