//! GPU tests: the engine on the real device. `scripts/gpu-test.sh` runs them on a GPU machine.
//!
//! A `harness = false` test run by libtest-mimic: each test is a trial of its own (filters,
//! `--exact`, `--list`, `--ignored`, `--include-ignored`, `--test-threads` work as with
//! libtest). Where no CUDA driver library loads, every trial is ignored and a line says why;
//! where the driver loads but GPU 0 does not open (`cuInit` or context creation fails, no
//! GPU), every trial fails with that error. The trials run one at a time unless
//! `--test-threads` says otherwise: they measure the driver's free memory.

use cudarc::driver::{LaunchConfig, PushKernelArg};
use gpumem::{
    AllocError, Allocator, AllocatorConfig, CudaAllocator, CudaDevice, Device, PolicyKind, StreamId, Tensor,
};
use libtest_mimic::{Arguments, Failed, Trial};
use streams::*;

mod streams;
use std::sync::Arc;

/// GPU 0. `main` runs the tests only where it opens.
fn gpu() -> CudaDevice {
    CudaDevice::new(0).expect("GPU 0 opened when main checked")
}

/// An allocator with the options `conf`, under PyTorch's algorithm unless they name another
/// policy (the library's default is the gpumem policy; tests name it where they mean it).
fn allocator(dev: CudaDevice, conf: &str) -> Arc<CudaAllocator> {
    let mut config = AllocatorConfig::parse(conf).unwrap();
    config.settle_policy(PolicyKind::Torch).unwrap();
    Arc::new(Allocator::new(dev, config).unwrap())
}

pub(crate) struct Lcg(pub(crate) u64);
impl Lcg {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn gpu_engine_invariants_hold_on_the_real_device() {
    let dev = gpu();
    for conf in [
        "",
        "expandable_segments:True",
        "max_split_size_mb:64",
        "policy:gpumem",
        "policy:gpumem,compact_factor:2,compaction:False",
    ] {
        let ctx = dev.context().clone();
        let side = ctx.new_stream().unwrap();
        let streams = [StreamId::DEFAULT, dev.stream_id(&side).unwrap()];
        let (free0, _) = dev.mem_get_info().unwrap();
        let a = allocator(dev.clone(), conf);
        let mut rng = Lcg(42);
        let mut live: Vec<u64> = Vec::new();
        for _ in 0..400 {
            match rng.next() % 10 {
                0..=4 => {
                    let size = match rng.next() % 3 {
                        0 => 1 + rng.next() % (1 << 20),
                        1 => (1 << 20) + rng.next() % (9 << 20),
                        _ => (10 << 20) + rng.next() % (200 << 20),
                    };
                    let s = streams[(rng.next() % 2) as usize];
                    live.push(a.malloc(size, s).unwrap());
                }
                5..=7 if !live.is_empty() => {
                    let i = (rng.next() as usize) % live.len();
                    a.free(live.swap_remove(i)).unwrap();
                }
                8 if !live.is_empty() => {
                    let i = (rng.next() as usize) % live.len();
                    a.record_stream(live[i], streams[1]).unwrap();
                }
                _ => a.empty_cache().unwrap(),
            }
            a.check_stats().unwrap();
        }
        for p in live.drain(..) {
            a.free(p).unwrap();
        }
        a.empty_cache().unwrap();
        a.check_stats().unwrap();
        assert_eq!(a.memory_reserved(), 0, "{conf}");
        let (free1, _) = dev.mem_get_info().unwrap();
        assert!(free1 + (4 << 20) >= free0, "{conf}: driver free memory came back ({free0} -> {free1})");
        side.synchronize().unwrap();
    }
}

fn gpu_tutorial_walkthrough_and_driver_free_memory() {
    let dev = gpu();
    let a = allocator(dev.clone(), "");
    let stream = dev.context().default_stream();
    // cuRAND loads its kernels into device memory on first use, outside any cache: warm it
    // up before measuring
    let mut warm = Tensor::<f32>::empty_with(&a, &stream, &[2]).unwrap();
    warm.fill_randn(0).unwrap();
    drop(warm);
    a.empty_cache().unwrap();
    stream.synchronize().unwrap();
    let (free0, _) = dev.mem_get_info().unwrap();
    let mut x = Tensor::<f32>::empty_with(&a, &stream, &[10000, 10000]).unwrap();
    x.fill_randn(1).unwrap();
    stream.synchronize().unwrap();
    assert_eq!(a.stats().requested_bytes.all().current, 400_000_000);
    let reserved = a.memory_reserved();
    assert_eq!(reserved, 400_556_032);
    let (free1, _) = dev.mem_get_info().unwrap();
    assert_eq!(free0 - free1, reserved, "the driver's free memory drops by what is reserved");
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), reserved, "empty_cache frees nothing while x lives");
    drop(x);
    assert_eq!(a.memory_allocated(), 0);
    assert_eq!(a.memory_reserved(), reserved);
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
    let (free2, _) = dev.mem_get_info().unwrap();
    assert_eq!(free2, free0, "the driver's free memory is back");
}

fn gpu_data_survives_other_allocations() {
    let dev = gpu();
    for conf in
        ["", "expandable_segments:True", "policy:gpumem", "policy:gpumem,compact_factor:2,compaction:False"]
    {
        let a = allocator(dev.clone(), conf);
        let stream = dev.context().default_stream();
        let n = 3 << 20;
        let pattern: Vec<i32> = (0..n as i32).map(|i| i.wrapping_mul(2654435761u32 as i32)).collect();
        let mut keep = Tensor::<i32>::empty_with(&a, &stream, &[n]).unwrap();
        keep.copy_from(&pattern).unwrap();
        let mut others = Vec::new();
        for i in 0..50usize {
            let len = 1000 + (i * 7919) % (4 << 20);
            let mut t = Tensor::<i32>::empty_with(&a, &stream, &[len]).unwrap();
            t.fill_ones().unwrap();
            if i % 3 == 0 {
                others.clear();
            }
            others.push(t);
            if i % 10 == 0 {
                a.empty_cache().unwrap();
            }
        }
        let h = Tensor::<gpumem::f16>::empty_with(&a, &stream, &[1001]).unwrap();
        drop(h);
        assert_eq!(keep.to_vec().unwrap(), pattern, "{conf}: the pattern survives");
        for t in &others {
            assert!(t.to_vec().unwrap().iter().all(|&x| x == 1));
        }
    }
}

unsafe extern "C" fn block_stream(_: *mut std::ffi::c_void) {
    std::thread::sleep(std::time::Duration::from_millis(300));
}

fn gpu_record_stream_holds_the_block_until_the_other_stream_is_done() {
    let dev = gpu();
    let ctx = dev.context().clone();
    let a_stream = ctx.new_stream().unwrap();
    let b_stream = ctx.new_stream().unwrap();
    let a = allocator(dev.clone(), "");
    let n = 16 << 20;
    let x = Tensor::<f32>::empty_with(&a, &a_stream, &[n]).unwrap();
    let mut y = Tensor::<f32>::empty_with(&a, &b_stream, &[n]).unwrap();
    let old = x.as_ptr();
    // B is held up for 300 ms by a host function, then copies from x
    // SAFETY: a host function with no data, on a live stream.
    unsafe {
        cudarc::driver::sys::cuLaunchHostFunc(b_stream.cu_stream(), Some(block_stream), std::ptr::null_mut())
            .result()
            .unwrap();
    }
    b_stream.memcpy_dtod(&x, &mut y).unwrap(); // records B's use of x
    drop(x);
    let z = Tensor::<f32>::empty_with(&a, &a_stream, &[n]).unwrap();
    assert_ne!(z.as_ptr(), old, "x's block must not be reused while B may still read it");
    b_stream.synchronize().unwrap();
    drop(z);
    let w = Tensor::<f32>::empty_with(&a, &a_stream, &[n]).unwrap();
    let after = Tensor::<f32>::empty_with(&a, &a_stream, &[n]).unwrap();
    assert!(w.as_ptr() == old || after.as_ptr() == old, "once B is done, x's block is reused");
    drop((w, after, y));
    ctx.synchronize().unwrap();
}

fn gpu_expandable_pages_map_and_unmap_safely() {
    let dev = gpu();
    let a = allocator(dev.clone(), "expandable_segments:True");
    let stream = dev.context().default_stream();
    let mut keep = Vec::new();
    for round in 0..20usize {
        let mut ts = Vec::new();
        for i in 0..8usize {
            let len = ((round * 8 + i) * 1_234_567) % (96 << 20) + 1;
            let mut t = Tensor::<u8>::empty_with(&a, &stream, &[len]).unwrap();
            t.fill_zeros().unwrap(); // queued work on the pages
            ts.push(t);
        }
        keep.push(ts.pop().unwrap());
        drop(ts);
        a.empty_cache().unwrap(); // unmaps pages that kernels just wrote: must wait first
    }
    dev.context().synchronize().expect("no illegal-address error");
    for t in &keep {
        assert!(t.to_vec().unwrap().iter().all(|&b| b == 0));
    }
    drop(keep);
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
    assert!(dev.counters().unmaps > 0);
}

fn gpu_out_of_memory_is_typed_and_recoverable() {
    let dev = gpu();
    for conf in ["", "expandable_segments:True", "policy:gpumem"] {
        let a = allocator(dev.clone(), conf);
        let (_, total) = dev.mem_get_info().unwrap();
        let p = a.malloc(1 << 30, StreamId::DEFAULT).unwrap();
        let e = a.malloc(total + (1 << 30), StreamId::DEFAULT).unwrap_err();
        let AllocError::OutOfMemory(oom) = &e else { panic!("{conf}: expected out of memory, got {e}") };
        assert_eq!(oom.total, total);
        assert!(oom.allocated >= 1 << 30);
        println!("{conf}: {e}");
        let q = a.malloc(1 << 30, StreamId::DEFAULT).unwrap();
        a.free(p).unwrap();
        a.free(q).unwrap();
        a.empty_cache().unwrap();
        assert_eq!(a.stats().num_ooms, 1);
    }
}

fn gpu_gpumem_recycles_a_page_only_after_its_stream_is_done() {
    let dev = gpu();
    let ctx = dev.context().clone();
    let a_stream = ctx.new_stream().unwrap();
    let b_stream = ctx.new_stream().unwrap();
    let a = allocator(dev.clone(), "policy:gpumem");
    let n = 32 << 20;
    let pattern: Vec<u8> = (0..n).map(|i| (i * 7 % 251) as u8).collect();
    let mut z = Tensor::<u8>::empty_with(&a, &b_stream, &[n]).unwrap();
    z.copy_from(&pattern).unwrap();
    let mut w = Tensor::<u8>::empty_with(&a, &b_stream, &[n]).unwrap();
    // B is held up for 300 ms, then copies z into w
    // SAFETY: a host function with no data, on a live stream.
    unsafe {
        cudarc::driver::sys::cuLaunchHostFunc(b_stream.cu_stream(), Some(block_stream), std::ptr::null_mut())
            .result()
            .unwrap();
    }
    b_stream.memcpy_dtod(&z, &mut w).unwrap();
    let t = std::time::Instant::now();
    drop(z); // a same-stream free: its pages are idle at once, while B still has to read them
    let unmaps = dev.counters().unmaps;
    // a request on another stream that needs new memory beyond the peak recycles idle pages
    let big = Tensor::<u8>::empty_with(&a, &a_stream, &[n]).unwrap();
    assert!(dev.counters().unmaps > unmaps, "z's pages were recycled");
    assert!(t.elapsed().as_millis() >= 200, "recycling waited for stream B ({:?})", t.elapsed());
    assert_eq!(w.to_vec().unwrap(), pattern, "B read z intact");
    drop((big, w));
    ctx.synchronize().expect("no illegal-address error");
}

/// `x[i] += 1` for `i < n`, in PTX (the driver compiles it for the GPU at load time).
const ADD_ONE_PTX: &str = r#"
.version 7.0
.target sm_70
.address_size 64
.visible .entry add_one(.param .u64 x, .param .u32 n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<5>;
    ld.param.u64 %rd1, [x];
    ld.param.u32 %r2, [n];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.s32 %r1, %r3, %r4, %r5;
    setp.ge.u32 %p1, %r1, %r2;
    @%p1 bra DONE;
    cvta.to.global.u64 %rd2, %rd1;
    mul.wide.u32 %rd3, %r1, 4;
    add.s64 %rd4, %rd2, %rd3;
    ld.global.u32 %r6, [%rd4];
    add.s32 %r7, %r6, 1;
    st.global.u32 [%rd4], %r7;
DONE:
    ret;
}
"#;

fn gpu_cudarc_kernels_take_gpumem_tensors() {
    let dev = gpu();
    let ctx = dev.context().clone();
    let module = ctx.load_module(cudarc::nvrtc::Ptx::from_src(ADD_ONE_PTX)).unwrap();
    let add_one = module.load_function("add_one").unwrap();
    let a = allocator(dev.clone(), "policy:gpumem");
    let stream = ctx.new_stream().unwrap();
    let other = ctx.new_stream().unwrap();
    let n = 1_000_003usize;
    let mut x = Tensor::<i32>::empty_with(&a, &stream, &[n]).unwrap();
    x.copy_from(&(0..n as i32).collect::<Vec<_>>()).unwrap();
    let n32 = n as u32;
    let mut launch = stream.launch_builder(&add_one);
    launch.arg(x.on_mut(&stream).unwrap()).arg(&n32);
    // SAFETY: add_one(int*, unsigned) matches the arguments; the grid covers n.
    unsafe { launch.launch(LaunchConfig::for_num_elems(n32)) }.unwrap();
    // a cudarc copy into a gpumem tensor on another stream records that use
    let mut y = Tensor::<i32>::empty_with(&a, &other, &[n]).unwrap();
    stream.synchronize().unwrap();
    other.memcpy_dtod(&x, &mut y).unwrap();
    let got = y.to_vec().unwrap();
    assert!(got.iter().enumerate().all(|(i, &v)| v == i as i32 + 1), "the kernel ran on gpumem memory");
}

fn gpu_global_api_and_every_gpu() {
    let n = gpumem::device_count().unwrap();
    // one allocator per GPU, all at once, each with its own data and its own counters
    let mut held = Vec::new();
    for d in 0..n {
        let a = gpumem::allocator(d).unwrap();
        assert_eq!(a.with_device(|dev| dev.index()), d);
        let stream = a.with_device(|dev| dev.context().default_stream());
        let mut t = Tensor::<i64>::empty_with(&a, &stream, &[(d + 1) << 20]).unwrap();
        t.copy_from(&vec![d as i64 + 7; (d + 1) << 20]).unwrap();
        held.push(t);
    }
    for (d, t) in held.iter().enumerate() {
        assert_eq!(gpumem::memory_allocated(d), 8 * ((d as u64 + 1) << 20), "GPU {d} counts only its own");
        assert!(t.to_vec().unwrap().iter().all(|&v| v == d as i64 + 7), "GPU {d} data");
    }
    drop(held);
    let x = Tensor::<f32>::ones(&[1000, 1000]).unwrap();
    assert!(x.to_vec().unwrap().iter().all(|&v| v == 1.0));
    let b = Tensor::<gpumem::bf16>::randn(&[4097]).unwrap();
    let v: Vec<f32> = b.to_vec().unwrap().iter().map(|x| x.to_f32()).collect();
    let mean = v.iter().sum::<f32>() / v.len() as f32;
    assert!(mean.abs() < 0.1, "randn mean {mean}");
    assert!(gpumem::memory_allocated(0) > 0);
    drop((x, b));
    gpumem::empty_cache().unwrap();
    assert_eq!(gpumem::memory_reserved(0), 0);
    assert_eq!(gpumem::memory_stats(0)["allocation.all.current"], 0);
    println!("{} GPU(s) exercised", n);
}

fn gpu_gpumem_compaction_moves_pages_under_live_tensors_intact() {
    let dev = gpu();
    let a = allocator(dev.clone(), "policy:gpumem,compaction:True");
    let stream = dev.context().default_stream();
    // a 64 MiB chunk, freed, then pinned by a 1 MiB tensor; a guard closes it from above
    let big = Tensor::<u8>::empty_with(&a, &stream, &[64 << 20]).unwrap();
    let guard = Tensor::<u8>::empty_with(&a, &stream, &[3 << 19]).unwrap();
    drop(big);
    let n = 1 << 18;
    let pattern: Vec<i32> = (0..n as i32).map(|i| i.wrapping_mul(-1640531527)).collect();
    let mut small = Tensor::<i32>::empty_with(&a, &stream, &[n]).unwrap();
    small.copy_from(&pattern).unwrap();
    assert_eq!(a.memory_reserved(), 66 << 20);
    // 100 MiB fit no hole: rather than raise the peak to 166 MiB, the page under the tensor
    // is copied to memory of its own at the same address and the chunk's free pages reused
    let mut grown = Tensor::<u8>::empty_with(&a, &stream, &[100 << 20]).unwrap();
    grown.fill_ones().unwrap();
    assert!(a.max_memory_reserved() <= 108 << 20, "peak {}", a.max_memory_reserved());
    assert_eq!(small.to_vec().unwrap(), pattern, "the tensor's contents moved with it");
    drop(grown);
    // empty_cache leaves only the pages under live tensors
    let (free0, _) = dev.mem_get_info().unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 4 << 20);
    let (free1, _) = dev.mem_get_info().unwrap();
    assert!(free1 >= free0 + (98 << 20), "the driver got the pages back ({free0} -> {free1})");
    assert_eq!(small.to_vec().unwrap(), pattern);
    drop((small, guard));
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
}

/// Note [The copy's memory] on real memory: at the peak, the page under a live tensor waits
/// in another stream's free memory while its chunk is remapped; the peak does not move and
/// both tensors keep their contents.
fn gpu_gpumem_staged_compaction_keeps_tensors_intact() {
    let dev = gpu();
    let a = allocator(dev.clone(), "policy:gpumem,compaction:True");
    let stream = dev.context().default_stream();
    let side = dev.context().new_stream().unwrap();
    let big = Tensor::<u8>::empty_with(&a, &stream, &[32 << 20]).unwrap();
    let guard = Tensor::<u8>::empty_with(&a, &stream, &[3 << 19]).unwrap();
    let bytes: Vec<u8> = (0..1 << 20).map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8).collect();
    let mut other = Tensor::<u8>::empty_with(&a, &side, &[1 << 20]).unwrap();
    other.copy_from(&bytes).unwrap();
    drop(big);
    let x = Tensor::<u8>::empty_with(&a, &stream, &[16 << 20]).unwrap();
    let n = 1 << 18;
    let pattern: Vec<i32> = (0..n as i32).map(|i| i.wrapping_mul(-1640531527)).collect();
    let mut small = Tensor::<i32>::empty_with(&a, &stream, &[n]).unwrap();
    small.copy_from(&pattern).unwrap();
    drop(x);
    assert_eq!(a.memory_reserved(), 36 << 20);
    let mut grown = Tensor::<u8>::empty_with(&a, &stream, &[20 << 20]).unwrap();
    grown.fill_ones().unwrap();
    assert_eq!(a.max_memory_reserved(), 36 << 20, "the copy waited in free memory");
    assert_eq!(small.to_vec().unwrap(), pattern, "the tensor's contents moved with it");
    assert_eq!(other.to_vec().unwrap(), bytes, "the staging area was free memory only");
    drop((small, guard, other, grown));
    side.synchronize().unwrap();
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
}

/// A staged remap of a chunk keeping three separate pages: each page's bytes go out to the
/// staging area and back.
fn gpu_staged_remap_of_several_ranges_keeps_every_one() {
    let dev = gpu();
    const MIB: u64 = 1 << 20;
    let va = dev.reserve(64 * MIB).unwrap();
    let (chunk, stage) = (va, va + 48 * MIB);
    dev.map(chunk, 32 * MIB).unwrap();
    dev.map(stage, 8 * MIB).unwrap();
    let pages = [chunk, chunk + 10 * MIB, chunk + 30 * MIB];
    let pattern = |i: usize| -> Vec<u8> {
        (0..2 << 20).map(|j: u32| (j.wrapping_mul(2654435761) >> 24) as u8 ^ i as u8).collect()
    };
    let staged: Vec<u8> = vec![0x5a; 8 << 20];
    // SAFETY: the ranges were just mapped, and no kernel uses them.
    unsafe {
        for (i, &p) in pages.iter().enumerate() {
            dev.write_bytes(p, &pattern(i)).unwrap();
        }
        dev.write_bytes(stage, &staged).unwrap();
    }
    let keep: Vec<(u64, u64)> = pages.iter().map(|&p| (p, 2 * MIB)).collect();
    let save: Vec<(u64, u64, u64)> =
        pages.iter().enumerate().map(|(i, &p)| (p, stage + 2 * MIB * i as u64, 2 * MIB)).collect();
    dev.remap_staged(chunk, 32 * MIB, &keep, &save).unwrap();
    dev.synchronize_device().unwrap(); // the copies back may still run (Device::remap_staged)
    let mut back = vec![0u8; 2 << 20];
    for (i, &p) in pages.iter().enumerate() {
        // SAFETY: the page was mapped again by the remap.
        unsafe { dev.read_bytes(p, &mut back).unwrap() };
        assert!(back == pattern(i), "page {i} lost its contents");
    }
    for &p in &pages {
        dev.unmap(p, 2 * MIB).unwrap();
    }
    dev.unmap(stage, 8 * MIB).unwrap();
    dev.unreserve(va, 64 * MIB).unwrap();
}

/// A training loop on real memory: tensors keep their contents step after step while the
/// policy settles (here best fit settles by itself, so no plan is made: Note [Periodic
/// plans]; `gpumem replay --device cuda` of the 24-step GPT-2 trace runs one on real memory),
/// and the later steps make no device call.
fn gpu_gpumem_periodic_plan_keeps_tensors_intact() {
    let dev = gpu();
    let a = allocator(dev.clone(), "policy:gpumem");
    let stream = dev.context().default_stream();
    let counts: Vec<usize> = (0..48).map(|i| ((i * 7919) % 61 + 4) << 14).collect(); // 256 KiB-4 MiB
    let calls = |a: &CudaAllocator| {
        let s = a.stats();
        s.num_device_alloc + s.num_device_free
    };
    let mut per_step = Vec::new();
    for step in 0..10 {
        per_step.push(calls(&a));
        let mut acts = Vec::new();
        for (i, &n) in counts.iter().enumerate() {
            let pattern: Vec<i32> = (0..n as i32).map(|j| j ^ (step * 1000 + i as i32)).collect();
            let mut t = Tensor::<i32>::empty_with(&a, &stream, &[n]).unwrap();
            t.copy_from(&pattern).unwrap();
            let mut tmp = Tensor::<i32>::empty_with(&a, &stream, &[n / 2]).unwrap();
            tmp.copy_from(&pattern[..n / 2]).unwrap();
            drop(tmp);
            acts.push((t, pattern));
        }
        for (t, pattern) in acts.into_iter().rev() {
            assert_eq!(t.to_vec().unwrap(), pattern, "step {step}: a tensor lost its contents");
        }
    }
    per_step.push(calls(&a));
    assert_eq!(per_step[10], per_step[6], "device calls in the last steps: {per_step:?}");
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
}

fn main() {
    let tests: &[(&str, fn())] = &[
        ("gpu_engine_invariants_hold_on_the_real_device", gpu_engine_invariants_hold_on_the_real_device),
        ("gpu_tutorial_walkthrough_and_driver_free_memory", gpu_tutorial_walkthrough_and_driver_free_memory),
        ("gpu_data_survives_other_allocations", gpu_data_survives_other_allocations),
        (
            "gpu_record_stream_holds_the_block_until_the_other_stream_is_done",
            gpu_record_stream_holds_the_block_until_the_other_stream_is_done,
        ),
        ("gpu_expandable_pages_map_and_unmap_safely", gpu_expandable_pages_map_and_unmap_safely),
        ("gpu_out_of_memory_is_typed_and_recoverable", gpu_out_of_memory_is_typed_and_recoverable),
        (
            "gpu_gpumem_recycles_a_page_only_after_its_stream_is_done",
            gpu_gpumem_recycles_a_page_only_after_its_stream_is_done,
        ),
        ("gpu_cudarc_kernels_take_gpumem_tensors", gpu_cudarc_kernels_take_gpumem_tensors),
        (
            "gpu_gpumem_compaction_moves_pages_under_live_tensors_intact",
            gpu_gpumem_compaction_moves_pages_under_live_tensors_intact,
        ),
        (
            "gpu_gpumem_staged_compaction_keeps_tensors_intact",
            gpu_gpumem_staged_compaction_keeps_tensors_intact,
        ),
        (
            "gpu_staged_remap_of_several_ranges_keeps_every_one",
            gpu_staged_remap_of_several_ranges_keeps_every_one,
        ),
        ("gpu_gpumem_periodic_plan_keeps_tensors_intact", gpu_gpumem_periodic_plan_keeps_tensors_intact),
        ("gpu_global_api_and_every_gpu", gpu_global_api_and_every_gpu),
        (
            "gpu_gpumem_side_stream_reads_while_the_main_stream_repeats_a_step",
            gpu_gpumem_side_stream_reads_while_the_main_stream_repeats_a_step,
        ),
        (
            "gpu_gpumem_kernels_on_two_threads_while_a_third_allocates",
            gpu_gpumem_kernels_on_two_threads_while_a_third_allocates,
        ),
        (
            "gpu_a_stream_dropped_before_the_tensor_used_on_it_is_still_waited_for",
            gpu_a_stream_dropped_before_the_tensor_used_on_it_is_still_waited_for,
        ),
        ("gpu_cuda_device_refuses_ids_it_does_not_know", gpu_cuda_device_refuses_ids_it_does_not_know),
    ];
    let mut args = Arguments::from_args();
    // one at a time by default: the tests measure the driver's free memory
    args.test_threads = args.test_threads.or(Some(1));
    // Where no driver library loads (`CudaDevice::new` would say `DeviceError::NoDriver`), every
    // test is ignored. Otherwise GPU 0 must open, as before, checked once (not for `--list`):
    // any error, or a panic in the driver's bindings (a symbol the loaded library lacks),
    // means a broken driver, and every test fails with it.
    let no_driver = !gpumem::driver_present();
    let broken = if no_driver || args.list {
        None
    } else {
        match std::panic::catch_unwind(|| CudaDevice::new(0)) {
            Ok(Ok(_)) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(p) => Some(match (p.downcast_ref::<String>(), p.downcast_ref::<&str>()) {
                (Some(m), _) => format!("opening it panicked: {m}"),
                (_, Some(m)) => format!("opening it panicked: {m}"),
                _ => "opening it panicked".to_string(),
            }),
        }
    };
    if no_driver && !args.list {
        eprintln!("gpu tests: no CUDA driver found (libcuda did not load): every GPU test is ignored");
    }
    let trials = tests
        .iter()
        .map(|&(name, test)| match &broken {
            Some(e) => {
                let why = format!("a CUDA driver loads, but GPU 0 did not open: {e}");
                Trial::test(name, move || Err(Failed::from(why)))
            }
            // without a driver library they are ignored (`--ignored` runs them, and they fail)
            None => Trial::test(name, move || {
                test();
                Ok(())
            })
            .with_ignored_flag(no_driver),
        })
        .collect();
    libtest_mimic::run(&args, trials).exit();
}
