"""gpumem inside PyTorch on a GPU: the plugin, PyTorch's memory functions, and what must
fail with a message naming gpumem. Each test runs in its own process, since enable() is
once per process and before CUDA starts. Skipped where there is no CUDA driver or no torch.
"""

from __future__ import annotations

import os
import sys
import textwrap

import pytest

import gpumem
from conftest import run_python


def _why_skip() -> str | None:
    if not gpumem.driver_present():
        return "no CUDA driver on this machine: the GPU tests of the PyTorch plugin are skipped"
    try:
        import torch  # noqa: F401
    except ImportError:
        return "torch is not installed: the GPU tests of the PyTorch plugin are skipped"
    return None


pytestmark = pytest.mark.skipif(_why_skip() is not None, reason=_why_skip() or "")

PRELUDE = """
import os, sys, gc
import torch
import gpumem.torch as gt
gt.enable(policy=POLICY)
MIB = 1 << 20
dev = torch.device("cuda", 0)
"""


def run(body: str, policy: str = "gpumem", **kw):
    return run_python(f"POLICY = {policy!r}\n" + PRELUDE + textwrap.dedent(body), **kw)


@pytest.mark.parametrize("policy", ["gpumem", "torch"])
def test_torch_cuda_memory_functions_report_gpumem(policy):
    run(
        """
        x = torch.empty(1 << 20, device=dev)            # 4 MiB
        assert torch.cuda.memory_allocated() == 4 * MIB, torch.cuda.memory_allocated()
        assert torch.cuda.memory_reserved() >= 4 * MIB
        a = gt.allocator(0)
        assert torch.cuda.memory_allocated() == a.memory_allocated()
        assert torch.cuda.memory_reserved() == a.memory_reserved()
        stats = torch.cuda.memory_stats()
        assert stats["allocated_bytes.all.current"] == 4 * MIB
        assert stats["allocation.all.current"] >= 1
        assert torch.cuda.memory.get_allocator_backend() == "pluggable"
        summary = torch.cuda.memory_summary()
        assert "Allocated memory" in summary and "4096 KiB" in summary, summary
        y = torch.empty(16 << 20, device=dev)
        del y
        assert torch.cuda.max_memory_allocated() >= 68 * MIB
        torch.cuda.reset_peak_memory_stats()
        assert torch.cuda.max_memory_allocated() == 4 * MIB
        torch.cuda.reset_accumulated_memory_stats()
        # torch.accelerator sees the same
        if hasattr(torch, "accelerator") and hasattr(torch.accelerator, "memory_allocated"):
            assert torch.accelerator.memory_allocated() == 4 * MIB
            assert torch.accelerator.memory_reserved() == torch.cuda.memory_reserved()
            assert torch.accelerator.memory_stats()["allocated_bytes.all.current"] == 4 * MIB
            torch.accelerator.reset_peak_memory_stats()
            torch.accelerator.empty_cache()
        del x
        torch.cuda.empty_cache()
        assert torch.cuda.memory_reserved() == 0
        a.check()
        print("ok")
        """,
        policy=policy,
    )


def test_enable_too_late_or_twice_says_so():
    p = run_python(
        """
        import torch, gpumem.torch as gt
        torch.zeros(1, device="cuda")
        try:
            gt.enable()
        except RuntimeError as e:
            assert "before CUDA is initialized" in str(e), e
        else:
            raise AssertionError("enable() after CUDA init did not fail")
        """
    )
    assert p.returncode == 0
    run(
        """
        gt.enable(policy=POLICY)            # the same again: nothing happens
        try:
            gt.enable(policy="torch")
        except RuntimeError as e:
            assert "already enabled" in str(e)
        else:
            raise AssertionError("a second policy was accepted")
        """
    )


@pytest.mark.parametrize("policy", ["gpumem", "torch"])
def test_out_of_memory_raises_and_the_program_goes_on(policy):
    run(
        """
        total = torch.cuda.mem_get_info()[1]
        keep = torch.empty(total // 2, dtype=torch.uint8, device=dev)
        try:
            torch.empty(total // 2 + (1 << 30), dtype=torch.uint8, device=dev)
        except RuntimeError as e:
            msg = str(e)
            assert msg.startswith("CUDA out of memory."), msg
            assert "gpumem" in msg and "reserved but unallocated" in msg, msg
        else:
            raise AssertionError("no out-of-memory error")
        del keep
        z = torch.ones(1 << 20, device=dev)
        assert float(z.sum()) == float(1 << 20)
        print("ok")
        """,
        policy=policy,
    )


def test_memory_fraction_caps_the_cache():
    run(
        """
        total = torch.cuda.mem_get_info()[1]
        torch.cuda.set_per_process_memory_fraction(0.1)
        assert abs(torch.cuda.get_per_process_memory_fraction() - 0.1) < 1e-9
        try:
            torch.empty(int(total * 0.2), dtype=torch.uint8, device=dev)
        except RuntimeError as e:
            assert "CUDA out of memory." in str(e) and "fraction" in str(e), e
        else:
            raise AssertionError("the cap was not applied")
        torch.empty(int(total * 0.05), dtype=torch.uint8, device=dev)
        """
    )


@pytest.mark.parametrize("policy", ["gpumem", "torch"])
def test_del_and_empty_cache_give_the_driver_its_memory_back(policy):
    run(
        """
        # CUDA loads the randn kernel's module into device memory at its first launch
        torch.randn(2, device=dev); torch.cuda.synchronize(); torch.cuda.empty_cache()
        free0 = torch.cuda.mem_get_info()[0]
        x = torch.randn(10000, 10000, device=dev)
        # what was asked (allocated may be larger: PyTorch's rounding keeps a segment's tail
        # that is too small to split in the block)
        assert torch.cuda.memory_stats()["requested_bytes.all.current"] == 400_000_000
        del x
        assert torch.cuda.memory_reserved() > 0
        torch.cuda.empty_cache()
        assert torch.cuda.memory_reserved() == 0
        free1 = torch.cuda.mem_get_info()[0]
        assert free1 == free0, (free0, free1, free0 - free1)
        """,
        policy=policy,
    )


@pytest.mark.parametrize("policy", ["gpumem", "torch"])
def test_record_stream_keeps_a_block_until_the_other_stream_is_done(policy):
    # PyTorch's test_record_stream: a block used on a side stream is not reused on the
    # default stream while the side stream's work is pending
    run(
        """
        side = torch.cuda.Stream()
        # load the kernels first: CUDA loads a kernel's module at its first launch, and that
        # may wait for the work already running, which would end the side stream's sleep
        with torch.cuda.stream(side):
            torch.cuda._sleep(1000)
            torch.ones(4, device=dev) * 2
        torch.cuda.synchronize()
        x = torch.ones(1 << 20, device=dev)
        ptr = x.data_ptr()
        with torch.cuda.stream(side):
            y = x * 2
            torch.cuda._sleep(int(1e9))     # keep the side stream busy (about half a second)
        x.record_stream(side)
        del x
        z = torch.empty(1 << 20, device=dev)
        assert z.data_ptr() != ptr, "handed out while the side stream may still read it"
        side.synchronize()
        assert float(y.sum()) == 2.0 * (1 << 20)
        # once the side stream is done, the block is free again
        del z
        w = torch.empty(1 << 20, device=dev)
        gt.allocator(0).check()
        """,
        policy=policy,
    )


def test_snapshots_carry_python_frames_and_open_in_pytorchs_viewer(tmp_path):
    snap = tmp_path / "snap.pickle"
    html = tmp_path / "out.html"
    run(
        f"""
        torch.cuda.memory._record_memory_history(max_entries=100000)
        def make_tensor():
            return torch.randn(1 << 20, device=dev)
        x = make_tensor()
        s = torch.cuda.memory._snapshot()
        live = [b for seg in s["segments"] for b in seg["blocks"] if b["state"] == "active_allocated"]
        names = [f["name"] for b in live for f in b["frames"]]
        assert "make_tensor" in names, names
        assert torch.cuda.memory_snapshot() == s["segments"]
        assert any(e["action"] == "alloc" for e in s["device_traces"][0])
        torch.cuda.memory._dump_snapshot({str(snap)!r})
        torch.cuda.memory._record_memory_history(enabled=None)
        """
    )
    p = run_python(
        f"""
        import subprocess, sys
        r = subprocess.run([sys.executable, "-m", "torch.cuda._memory_viz", "trace_plot", {str(snap)!r}, "-o", {str(html)!r}],
                           capture_output=True, text=True)
        print(r.stdout, r.stderr)
        assert r.returncode == 0
        """
    )
    assert html.exists() and html.stat().st_size > 1000, p.stdout


def test_what_cannot_work_under_a_plugin_fails_naming_gpumem():
    run(
        """
        def fails(f, *words):
            try:
                f()
            except Exception as e:
                msg = str(e)
                assert "gpumem" in msg and all(w in msg for w in words), msg
                return
            raise AssertionError(f"{f} did not fail")
        x = torch.ones(4, device=dev)
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        def capture():
            with torch.cuda.stream(s):
                with torch.cuda.graph(g):
                    torch.ones(4, device=dev) * 2
        fails(capture, "graph")
        fails(lambda: torch.cuda.MemPool(), "MemPool")
        def bench():
            torch.backends.cudnn.benchmark = True
        fails(bench, "cudnn.benchmark")
        assert torch.backends.cudnn.benchmark is False
        fails(lambda: x.untyped_storage()._share_cuda_(), "IPC")
        # and the program goes on
        assert float((x * 3).sum()) == 12.0
        """
    )


@pytest.mark.parametrize("policy", ["gpumem", "torch"])
def test_threads_on_their_own_streams_train_without_interfering(policy):
    run(
        """
        import threading
        errors = []
        def work(i):
            try:
                s = torch.cuda.Stream()
                with torch.cuda.stream(s):
                    torch.manual_seed(i)
                    w = torch.randn(256, 256, device=dev)
                    for step in range(200):
                        a = torch.randn(64 + step % 7, 256, device=dev)
                        b = (a @ w).relu_()
                        c = b.sum()
                        del a, b
                    s.synchronize()
                    assert torch.isfinite(c)
            except Exception as e:
                errors.append(repr(e))
        ts = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in ts: t.start()
        for t in ts: t.join()
        assert not errors, errors
        torch.cuda.synchronize()
        gt.allocator(0).check()
        """,
        policy=policy,
    )


def test_a_forked_child_neither_hangs_nor_corrupts_the_parent():
    run(
        """
        x = torch.arange(1 << 20, device=dev, dtype=torch.float32)
        pid = os.fork()
        if pid == 0:
            del x               # the parent's memory: the child's free does nothing
            gc.collect()
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
        assert float(x.sum()) == float(sum(range(1 << 20)))
        y = torch.ones(1 << 20, device=dev)
        assert y.data_ptr() != x.data_ptr()
        """,
        timeout=120,
    )


def test_python_m_gpumem_demo_runs_the_walk_through_inside_pytorch():
    p = run_python("import runpy, sys; sys.argv = ['gpumem', 'demo']; runpy.run_module('gpumem', run_name='__main__')")
    out = p.stdout
    assert "inside PyTorch" in out, out
    assert "400.00 MB = 381.47 MiB" in out, out
    assert "memory_reserved()  = 0.00 MB" in out, out
    assert "back where it began" in out and "NOT back" not in out, out


def test_track_finds_a_tensor_kept_alive_in_a_list_with_the_line_that_made_it():
    p = run(
        """
        def double(x):
            return x * 2        # the line that allocates what is kept
        kept = []
        with gt.track() as t:
            for i in range(4):
                x = torch.randn(1 << 20, device=dev)
                y = double(x)
                if i == 2:
                    kept.append(y)   # the leak: one tensor outlives the block
            del x, y
        print(t)
        assert t.count == 1 and t.bytes == 4 * MIB, (t.count, t.bytes)
        site = t.sites[0]
        assert site["frames"][0]["name"] == "double", site
        assert site["location"].startswith("<string>:") and "double" in site["location"], site
        assert gt.leaks().count >= 1
        """
    )
    assert "double" in p.stdout, p.stdout
