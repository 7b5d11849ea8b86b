"""The C interface PyTorch calls, driven through ctypes on the simulated device.

Each test runs in its own process, since the plugin's allocators are made once per process.
`gpumem_try_malloc` is the same allocation as `gpumem_torch_malloc` with the error returned
instead of thrown (ctypes cannot catch a C++ exception).
"""

from __future__ import annotations

import textwrap

from conftest import run_python

PRELUDE = """
import ctypes, os, sys, threading
import gpumem
from gpumem import _gpumem
_gpumem._plugin_configure(POLICY, "sim", 8 << 30)
lib = ctypes.CDLL(_gpumem.__file__)
lib.gpumem_torch_malloc.restype = ctypes.c_void_p
lib.gpumem_torch_malloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
lib.gpumem_try_malloc.restype = ctypes.c_int
lib.gpumem_try_malloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p,
                                  ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_size_t]
lib.gpumem_torch_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
lib.gpumem_torch_record_stream.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
lib.gpumem_torch_set_fraction.argtypes = [ctypes.c_double, ctypes.c_int]
lib.gpumem_torch_base_alloc.restype = ctypes.c_void_p
lib.gpumem_torch_base_alloc.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t)]

def try_malloc(size, device=0, stream=0):
    out = ctypes.c_void_p()
    msg = ctypes.create_string_buffer(2048)
    rc = lib.gpumem_try_malloc(size, device, stream, ctypes.byref(out), msg, len(msg))
    return (out.value or 0, None) if rc == 0 else (None, msg.value.decode())

def free(ptr, device=0, stream=0):
    lib.gpumem_torch_free(ptr, 0, device, stream)

MIB = 1 << 20
"""


def run(body: str, policy: str = "gpumem", **kw):
    return run_python(f"POLICY = {policy!r}\n" + PRELUDE + textwrap.dedent(body), **kw)


def test_malloc_and_free_through_the_c_interface_update_the_stats_python_reads():
    run(
        """
        p = lib.gpumem_torch_malloc(4 * MIB, 0, None)
        assert p, "a pointer"
        a = _gpumem._plugin_allocator(0)
        assert a.memory_allocated() == 4 * MIB, a.memory_allocated()
        assert _gpumem._plugin_devices() == [0]
        free(p)
        assert a.memory_allocated() == 0
        lib.gpumem_torch_empty_cache()
        assert a.memory_reserved() == 0
        assert lib.gpumem_torch_malloc(0, 0, None) is None, "size 0 gives null, as PyTorch expects"
        a.check()
        """
    )


def test_every_call_uses_its_device_argument():
    run(
        """
        p0 = lib.gpumem_torch_malloc(MIB, 0, None)
        p1 = lib.gpumem_torch_malloc(3 * MIB, 1, None)
        a0, a1 = _gpumem._plugin_allocator(0), _gpumem._plugin_allocator(1)
        assert (a0.memory_allocated(), a1.memory_allocated()) == (MIB, 3 * MIB)
        free(p1, device=1)
        assert (a0.memory_allocated(), a1.memory_allocated()) == (MIB, 0)
        lib.gpumem_torch_set_fraction(0.5, 1)
        assert a1.per_process_memory_fraction() == 0.5 and a0.per_process_memory_fraction() == 1.0
        ptr, err = try_malloc(MIB, device=99)
        assert ptr is None and "out of range" in err, err
        """
    )


def test_out_of_memory_says_cuda_out_of_memory_first_and_what_is_held():
    run(
        """
        keep, err = try_malloc(5 << 30)
        assert err is None
        ptr, err = try_malloc(5 << 30)
        assert ptr is None
        # PyTorch's own first sentences, which programs and PyTorch's tests match on
        assert err.startswith("CUDA out of memory. Tried to allocate 5.00 GiB. GPU 0 has a total capacity of 8.00 GiB of which"), err
        assert "gpumem" in err and "reserved but unallocated" in err, err
        ptr, err = try_malloc(1 << 62)
        assert ptr is None and err.startswith("CUDA out of memory. Tried to allocate more than 1EB memory."), err
        free(keep)
        again, err = try_malloc(5 << 30)
        assert err is None, "the program can free memory and go on"
        """,
    )


def test_a_memory_fraction_is_the_cap_and_the_hint_says_so():
    run(
        """
        lib.gpumem_torch_set_fraction(0.25, 0)
        ptr, err = try_malloc(3 << 30)
        assert ptr is None and "fraction" in err, err
        lib.gpumem_torch_set_fraction(1.0, 0)
        ptr, err = try_malloc(3 << 30)
        assert err is None
        """,
        policy="torch",
    )


def test_a_foreign_pointer_or_double_free_is_reported_once_and_changes_nothing():
    p = run(
        """
        p = lib.gpumem_torch_malloc(MIB, 0, None)
        free(p)
        free(p)          # double free
        free(12345678)   # never ours
        lib.gpumem_torch_record_stream(12345678, 3)   # ignored, as PyTorch's own allocator does
        a = _gpumem._plugin_allocator(0)
        assert a.memory_allocated() == 0
        a.check()
        q = lib.gpumem_torch_malloc(MIB, 0, None)
        assert q
        """
    )
    assert p.stderr.count("gpumem: free of") == 1, p.stderr


def test_record_stream_and_base_allocation():
    run(
        """
        p = lib.gpumem_torch_malloc(3 * MIB, 0, 7)
        lib.gpumem_torch_record_stream(p, 9)
        size = ctypes.c_size_t(0)
        base = lib.gpumem_torch_base_alloc(p + 4096, ctypes.byref(size))
        seg = [s for s in _gpumem._plugin_snapshot()["segments"] if s["address"] <= p < s["address"] + s["total_size"]]
        assert base == seg[0]["address"] and size.value == seg[0]["total_size"], (base, size.value, seg)
        assert lib.gpumem_torch_base_alloc(42, ctypes.byref(size)) == 42, "not ours: itself"
        free(p, stream=7)
        _gpumem._plugin_allocator(0).check()
        """,
        policy="torch",
    )


def test_free_works_from_any_thread_while_others_allocate_on_their_own_streams():
    for policy in ("gpumem", "torch", "torch-expandable"):
        run(
            """
            import queue
            handoff = queue.Queue()
            errors = []
            def producer(stream):
                try:
                    for i in range(400):
                        p, err = try_malloc((i % 13 + 1) * 50_000, 0, stream)
                        assert err is None, err
                        if i % 5 == 0:
                            lib.gpumem_torch_record_stream(p, stream + 100)
                        handoff.put((p, stream))
                except Exception as e:
                    errors.append(e)
            def consumer():
                while True:
                    item = handoff.get()
                    if item is None:
                        return
                    free(item[0], 0, item[1])
            producers = [threading.Thread(target=producer, args=(s,)) for s in range(1, 9)]
            consumers = [threading.Thread(target=consumer) for _ in range(4)]
            for t in producers + consumers:
                t.start()
            for t in producers:
                t.join()
            for _ in consumers:
                handoff.put(None)
            for t in consumers:
                t.join()
            assert not errors, errors
            a = _gpumem._plugin_allocator(0)
            assert a.memory_allocated() == 0
            a.check()
            """,
            policy=policy,
        )


def test_after_fork_the_child_allocates_nothing_and_frees_nothing_of_the_parents():
    run(
        """
        p = lib.gpumem_torch_malloc(4 * MIB, 0, None)
        pid = os.fork()
        if pid == 0:
            free(p)   # the parent's memory: nothing happens
            ptr, err = try_malloc(MIB)
            ok = ptr is None and "forked" in err and _gpumem._forked()
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0, status
        a = _gpumem._plugin_allocator(0)
        assert a.memory_allocated() == 4 * MIB, "the parent's block is still live"
        free(p)
        assert a.memory_allocated() == 0 and not _gpumem._forked()
        """
    )


def test_the_policy_cannot_change_once_an_allocator_exists():
    run(
        """
        p = lib.gpumem_torch_malloc(MIB, 0, None)
        try:
            _gpumem._plugin_configure("torch", "sim", None)
        except RuntimeError as e:
            assert "already exists" in str(e)
        else:
            raise AssertionError("reconfigured a live allocator")
        """
    )


def test_history_records_python_frames_of_the_allocating_line():
    run(
        """
        _gpumem._plugin_record_history(True, 1000, True)
        # PyDLL keeps the GIL during the call, as PyTorch's ops do when Python calls them
        # (plain ctypes releases it, and a thread without the GIL records no frames)
        held = ctypes.PyDLL(_gpumem.__file__)
        held.gpumem_torch_malloc.restype = ctypes.c_void_p
        held.gpumem_torch_malloc.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        def make_block():
            return held.gpumem_torch_malloc(2 * MIB, 0, None)
        p = make_block()
        snap = _gpumem._plugin_snapshot()
        live = [b for s in snap["segments"] for b in s["blocks"] if b["state"] == "active_allocated"]
        names = [f["name"] for f in live[0]["frames"]]
        assert "make_block" in names, names
        entries = snap["device_traces"][0]
        assert any(e["action"] == "alloc" and e["addr"] == p for e in entries)
        _gpumem._plugin_record_history(False)
        assert _gpumem._plugin_snapshot()["device_traces"][0] == []
        # ctypes releases the GIL for the call, as PyTorch's ops do: the stack source takes it
        _gpumem._plugin_record_history(True, 1000, True)
        def without_gil():
            return lib.gpumem_torch_malloc(MIB, 0, None)
        r = without_gil()
        live = {b["address"]: b for s in _gpumem._plugin_snapshot()["segments"] for b in s["blocks"]}
        assert "without_gil" in [f["name"] for f in live[r]["frames"]], live[r]
        # another thread gets its own frames
        t = threading.Thread(target=lambda: out.append(lib.gpumem_torch_malloc(MIB, 0, None)))
        out = []
        t.start(); t.join()
        live = {b["address"]: b for s in _gpumem._plugin_snapshot()["segments"] for b in s["blocks"]}
        assert [f["name"] for f in live[out[0]]["frames"]][-1:] == ["_bootstrap"], live[out[0]]
        """
    )
