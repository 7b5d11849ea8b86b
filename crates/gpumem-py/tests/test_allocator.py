"""gpumem.Allocator and gpumem.replay on the simulated device."""

from __future__ import annotations

import pickle
import threading

import pytest

import gpumem
from conftest import trace

MIB = 1 << 20


@pytest.mark.parametrize("policy", gpumem.POLICIES)
def test_malloc_free_empty_cache_leave_nothing(policy):
    a = gpumem.Allocator(policy=policy, device="sim", capacity=8 << 30)
    ptrs = [a.malloc(s) for s in (512, 3 * MIB, 100 * MIB, 7)]
    assert len(set(ptrs)) == 4
    assert a.memory_allocated() >= 103 * MIB
    assert a.memory_reserved() >= a.memory_allocated()
    a.check()
    for p in ptrs:
        a.free(p)
    assert a.memory_allocated() == 0
    assert a.max_memory_allocated() >= 103 * MIB
    a.empty_cache()
    assert a.memory_reserved() == 0
    assert a.mem_get_info()[0] == 8 << 30
    a.check()


def test_torch_policy_rounds_as_pytorch_does():
    a = gpumem.Allocator(policy="torch", device="sim")
    a.malloc(MIB + 1)
    assert a.memory_reserved() == 20 * MIB  # 1-10 MiB requests share 20 MiB segments
    assert a.policy == "torch" and a.device == "sim"


def test_memory_stats_have_pytorchs_keys_and_the_summary_its_table():
    a = gpumem.Allocator(policy="torch", device="sim")
    p = a.malloc(4 * MIB)
    s = a.memory_stats()
    for pool in ("all", "small_pool", "large_pool"):
        for metric in ("current", "peak", "allocated", "freed"):
            for stat in ("allocation", "allocated_bytes", "reserved_bytes", "segment", "active", "active_bytes",
                         "inactive_split", "inactive_split_bytes", "requested_bytes"):
                assert f"{stat}.{pool}.{metric}" in s
    for key in ("num_alloc_retries", "num_ooms", "num_device_alloc", "num_device_free", "num_sync_all_streams"):
        assert key in s
    assert s["allocated_bytes.all.current"] == 4 * MIB
    assert s["requested_bytes.all.current"] == 4 * MIB
    summary = a.memory_summary()
    assert "PyTorch CUDA memory summary" in summary and "Allocated memory" in summary
    a.free(p)


def test_reset_peak_memory_stats():
    a = gpumem.Allocator(device="sim")
    p = a.malloc(64 * MIB)
    a.free(p)
    assert a.max_memory_allocated() >= 64 * MIB
    a.reset_peak_memory_stats()
    assert a.max_memory_allocated() == 0
    assert a.max_memory_reserved() == a.memory_reserved()


@pytest.mark.parametrize("policy", gpumem.POLICIES)
def test_out_of_memory_is_a_typed_error_that_says_where_memory_is(policy):
    a = gpumem.Allocator(policy=policy, device="sim", capacity=1 << 30)
    keep = a.malloc(600 * MIB)
    with pytest.raises(gpumem.OutOfMemoryError) as e:
        a.malloc(600 * MIB)
    msg = str(e.value)
    assert "tried to allocate" in msg and "free" in msg and "reserved but unallocated" in msg
    assert isinstance(e.value, RuntimeError)
    # the allocator goes on working
    a.free(keep)
    a.free(a.malloc(600 * MIB))
    a.check()


def test_bad_input_is_a_clear_error_and_changes_nothing():
    a = gpumem.Allocator(device="sim")
    p = a.malloc(MIB)
    with pytest.raises(ValueError, match="not allocated by this allocator"):
        a.free(p + 4096)
    a.free(p)
    with pytest.raises(ValueError, match="already freed"):
        a.free(p)
    with pytest.raises(ValueError, match="fraction"):
        a.set_per_process_memory_fraction(1.5)
    with pytest.raises(ValueError, match="unknown device"):
        gpumem.Allocator(device="tpu")
    with pytest.raises(ValueError):
        gpumem.Allocator(policy="no-such-policy")
    with pytest.raises(ValueError, match="capacity"):
        gpumem.Allocator(device="sim", capacity=0)
    assert a.malloc(0) == 0
    a.free(0)
    a.check()


def test_memory_fraction_caps_reserved_memory():
    a = gpumem.Allocator(policy="torch", device="sim", capacity=10 << 30)
    a.set_per_process_memory_fraction(0.25)
    assert a.per_process_memory_fraction() == pytest.approx(0.25)
    p = a.malloc(2 << 30)
    with pytest.raises(gpumem.OutOfMemoryError, match="fraction"):
        a.malloc(1 << 30)
    a.free(p)


def test_record_stream_keeps_a_block_from_its_stream_until_the_other_is_done():
    a = gpumem.Allocator(policy="torch", device="sim")
    p = a.malloc(4 * MIB, stream=1)
    a.record_stream(p, 2)
    a.free(p)
    snap = a.snapshot()
    states = {b["state"] for s in snap["segments"] for b in s["blocks"]}
    # the simulated device completes work at once, so the wait is done by the next call
    assert states <= {"inactive", "active_pending_free"}
    a.check()


def test_snapshot_is_pytorchs_shape_with_python_frames_and_pickles_with_protocol_4():
    a = gpumem.Allocator(device="sim")
    a.record_history(True, 1000)
    p = a.malloc(3 * MIB)  # this line is in the block's frames
    snap = a.snapshot()
    blocks = [b for s in snap["segments"] for b in s["blocks"] if b["state"] == "active_allocated"]
    assert len(blocks) == 1
    frames = blocks[0]["frames"]
    assert frames and frames[0]["name"] == "test_snapshot_is_pytorchs_shape_with_python_frames_and_pickles_with_protocol_4"
    assert frames[0]["filename"].endswith("test_allocator.py")
    for s in snap["segments"]:
        # blocks tile their segment in address order, as PyTorch's viewers require
        assert sum(b["size"] for b in s["blocks"]) == s["total_size"]
        assert s["blocks"][0]["address"] == s["address"]
    actions = [e["action"] for e in snap["device_traces"][0]]
    assert "alloc" in actions
    pickle.loads(pickle.dumps(snap, protocol=4))
    a.free(p)
    a.record_history(False)
    assert a.snapshot()["device_traces"][0] == []


@pytest.mark.parametrize("policy", gpumem.POLICIES)
def test_threads_on_their_own_streams_share_one_allocator(policy):
    a = gpumem.Allocator(policy=policy, device="sim")
    errors = []

    def work(stream):
        try:
            for i in range(300):
                ptrs = [a.malloc((i % 7 + 1) * 100_000, stream) for _ in range(4)]
                if i % 3 == 0:
                    a.record_stream(ptrs[0], (stream % 8) + 1)
                for p in ptrs:
                    a.free(p)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(1, 9)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert a.memory_allocated() == 0
    a.check()


def test_replay_returns_the_figures_of_gpumem_replay_json():
    rows = gpumem.replay(trace("resnet50_train.jsonl.gz"))
    assert [r["policy"] for r in rows] == ["torch", "torch-expandable", "gpumem"]
    by = {r["policy"]: r for r in rows}
    assert by["gpumem"]["reserved_ratio"] <= 1.02
    assert by["torch"]["peak_reserved"] > by["gpumem"]["peak_reserved"]
    assert all(r["ooms"] == 0 and r["device"] == "sim" for r in rows)
    verified = gpumem.replay(trace("resnet50_train.jsonl.gz"), "torch", verify=True)[0]
    assert verified["allocs_matched"] == verified["allocs_expected"]


def test_replay_of_a_missing_or_bad_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no-such.jsonl"):
        gpumem.replay(str(tmp_path / "no-such.jsonl"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl"):
        gpumem.replay(bad)


def test_leaks_group_live_blocks_by_the_line_that_allocated_them():
    a = gpumem.Allocator(device="sim")
    a.record_history(True, 1000)
    before = a.malloc(MIB)
    mark = a.allocation_mark()
    kept = [a.malloc(2 * MIB) for _ in range(3)]  # the leak
    gone = a.malloc(5 * MIB)
    a.free(gone)
    report = a.leaks_since(mark)
    assert (report.count, report.bytes) == (3, 6 * MIB)
    site = report.sites[0]
    assert site["count"] == 3 and site["bytes"] == 6 * MIB
    assert "test_allocator.py" in site["location"], site["location"]
    assert "test_leaks_group_live_blocks" in str(report)
    everything = a.leaks()
    assert everything.count == 4 and len(everything) == 4
    for p in kept + [before]:
        a.free(p)
    assert a.leaks().count == 0
