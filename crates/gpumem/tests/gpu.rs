//! GPU tests: the engine on the real device. `scripts/gpu-test.sh` runs them on a GPU machine.
//!
//! A `harness = false` test run by libtest-mimic: each test is a trial of its own (filters,
//! `--exact`, `--list`, `--ignored`, `--include-ignored`, `--test-threads` work as with
//! libtest). Where no CUDA driver library loads, every trial is ignored and a line says why;
//! where the driver loads but GPU 0 does not open (`cuInit` or context creation fails, no
//! GPU), every trial fails with that error. The trials run one at a time unless
//! `--test-threads` says otherwise: they measure the driver's free memory.

use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use gpumem::{
    AllocError, Allocator, AllocatorConfig, CudaAllocator, CudaDevice, Device, DeviceError, EventId,
    PolicyKind, StreamId, Tensor,
};
use libtest_mimic::{Arguments, Failed, Trial};
use std::sync::atomic::{AtomicUsize, Ordering};
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

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
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

/// `dst[i] = src[i] + 1` for `i < n`, in PTX like `ADD_ONE_PTX` (no nvrtc needed).
const COPY_PLUS_ONE_PTX: &str = r#"
.version 7.0
.target sm_70
.address_size 64
.visible .entry copy_plus_one(.param .u64 dst, .param .u64 src, .param .u32 n)
{
    .reg .pred %p<2>;
    .reg .b32 %r<8>;
    .reg .b64 %rd<8>;
    ld.param.u64 %rd1, [dst];
    ld.param.u64 %rd2, [src];
    ld.param.u32 %r2, [n];
    mov.u32 %r3, %ctaid.x;
    mov.u32 %r4, %ntid.x;
    mov.u32 %r5, %tid.x;
    mad.lo.s32 %r1, %r3, %r4, %r5;
    setp.ge.u32 %p1, %r1, %r2;
    @%p1 bra DONE;
    mul.wide.u32 %rd3, %r1, 4;
    cvta.to.global.u64 %rd4, %rd2;
    add.s64 %rd5, %rd4, %rd3;
    ld.global.u32 %r6, [%rd5];
    add.s32 %r7, %r6, 1;
    cvta.to.global.u64 %rd6, %rd1;
    add.s64 %rd7, %rd6, %rd3;
    st.global.u32 [%rd7], %r7;
DONE:
    ret;
}
"#;

fn copy_plus_one(dev: &CudaDevice) -> CudaFunction {
    let module = dev.context().load_module(cudarc::nvrtc::Ptx::from_src(COPY_PLUS_ONE_PTX)).unwrap();
    module.load_function("copy_plus_one").unwrap()
}

/// Launches `dst = src + 1` on `stream`; `on`/`on_mut` record both uses there.
fn launch_copy_plus_one(
    f: &CudaFunction,
    stream: &Arc<CudaStream>,
    dst: &mut Tensor<i32>,
    src: &Tensor<i32>,
) {
    assert_eq!(dst.numel(), src.numel());
    let n = src.numel() as u32;
    let mut launch = stream.launch_builder(f);
    launch.arg(dst.on_mut(stream).unwrap()).arg(src.on(stream).unwrap()).arg(&n);
    // SAFETY: copy_plus_one(int*, const int*, unsigned) matches the arguments, and the grid
    // covers n elements of both tensors.
    unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }.unwrap();
}

unsafe extern "C" fn sleep_ms(ms: *mut std::ffi::c_void) {
    std::thread::sleep(std::time::Duration::from_millis(ms as u64));
}

/// Holds `stream` up for `ms` milliseconds: work queued after this waits.
fn hold(stream: &CudaStream, ms: u64) {
    // SAFETY: a host function whose data is a number, not a pointer, on a live stream.
    unsafe {
        cudarc::driver::sys::cuLaunchHostFunc(
            stream.cu_stream(),
            Some(sleep_ms),
            ms as *mut std::ffi::c_void,
        )
        .result()
        .unwrap();
    }
}

/// The first difference between `got` and `want`, for messages that do not print megabytes.
fn same(got: &[i32], want: &[i32]) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("{} values, expected {}", got.len(), want.len()));
    }
    match got.iter().zip(want).position(|(g, w)| g != w) {
        None => Ok(()),
        Some(i) => Err(format!("value {i} is {}, expected {}", got[i], want[i])),
    }
}

/// An allocator under the library's default policy (gpumem).
fn default_allocator(dev: CudaDevice) -> Arc<CudaAllocator> {
    let a = Arc::new(Allocator::new(dev, AllocatorConfig::default()).unwrap());
    assert_eq!(a.policy(), PolicyKind::Gpumem);
    a
}

/// A side stream reads tensors of the main stream while the main stream repeats one step
/// under the default policy (a training loop, the pattern its periodic plans are made from).
/// The side stream is held up, and each tensor it reads is dropped before it has read it:
/// the recorded uses (a kernel through `Tensor::on`, a cudarc copy through `DevicePtr`) keep
/// those blocks from being handed out again too early, and a copy on a stream gpumem does not
/// know waits before it returns. Every copy holds what its tensor held.
fn gpu_gpumem_side_stream_reads_while_the_main_stream_repeats_a_step() {
    let dev = gpu();
    let ctx = dev.context().clone();
    let f = copy_plus_one(&dev);
    let a = default_allocator(dev.clone());
    let main = ctx.default_stream();
    let side = ctx.new_stream().unwrap();
    let loose = ctx.new_stream().unwrap(); // never given to gpumem
    let counts: Vec<usize> = (0..48).map(|i| ((i * 7919) % 61 + 4) << 14).collect(); // 256 KiB-4 MiB
    for step in 0..10i32 {
        hold(&side, 100);
        let mut acts = Vec::new();
        let mut reads = Vec::new();
        let mut copies = Vec::new();
        for (i, &n) in counts.iter().enumerate() {
            let pattern: Vec<i32> = (0..n as i32).map(|j| j ^ (step * 1000 + i as i32)).collect();
            let mut t = Tensor::<i32>::empty_with(&a, &main, &[n]).unwrap();
            t.copy_from(&pattern).unwrap();
            let mut tmp = Tensor::<i32>::empty_with(&a, &main, &[n / 2]).unwrap();
            tmp.copy_from(&pattern[..n / 2]).unwrap();
            drop(tmp);
            match i % 8 {
                0 | 4 => {
                    let mut out = Tensor::<i32>::empty_with(&a, &side, &[n]).unwrap();
                    launch_copy_plus_one(&f, &side, &mut out, &t);
                    drop(t);
                    reads.push((i, out, pattern.iter().map(|v| v + 1).collect::<Vec<_>>()));
                }
                1 | 5 => {
                    let mut out = Tensor::<i32>::empty_with(&a, &side, &[n]).unwrap();
                    side.memcpy_dtod(&t, &mut out).unwrap();
                    drop(t);
                    reads.push((i, out, pattern));
                }
                2 => {
                    let mut out = loose.alloc_zeros::<i32>(n).unwrap();
                    loose.memcpy_dtod(&t, &mut out).unwrap();
                    drop(t);
                    copies.push((i, out, pattern));
                }
                _ => acts.push((i, t, pattern)),
            }
        }
        for (i, t, pattern) in acts.into_iter().rev() {
            same(&t.to_vec().unwrap(), &pattern)
                .unwrap_or_else(|e| panic!("step {step}, tensor {i} of the main stream: {e}"));
        }
        side.synchronize().unwrap();
        for (i, out, want) in reads {
            same(&out.to_vec().unwrap(), &want)
                .unwrap_or_else(|e| panic!("step {step}, tensor {i} read on the side stream: {e}"));
        }
        for (i, out, pattern) in copies {
            let got = loose.clone_dtoh(&out).unwrap();
            loose.synchronize().unwrap();
            same(&got, &pattern)
                .unwrap_or_else(|e| panic!("step {step}, tensor {i} copied on a loose stream: {e}"));
        }
    }
    ctx.synchronize().expect("no illegal-address error");
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
}

/// Counts a finished thread, panicking or not, so that the threads waiting for it end.
struct Finished<'a>(&'a AtomicUsize);
impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// Two threads launch kernels on streams of their own under the default policy, each reading
/// a tensor of the default stream that it drops while the kernel still waits, while a third
/// thread allocates on the default stream and overwrites every block it gets. A block handed
/// out before its kernel read it would show in that kernel's output; every output is checked.
fn gpu_gpumem_kernels_on_two_threads_while_a_third_allocates() {
    let dev = gpu();
    let ctx = dev.context().clone();
    let f = copy_plus_one(&dev);
    let a = default_allocator(dev.clone());
    let finished = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for worker in 0..2i32 {
            let (a, f, ctx, finished) = (&a, &f, &ctx, &finished);
            s.spawn(move || {
                let _done = Finished(finished);
                let main = ctx.default_stream();
                let stream = ctx.new_stream().unwrap();
                let mut outs = std::collections::VecDeque::new();
                let check = |round: i32, dst: Tensor<i32>, want: Vec<i32>| {
                    same(&dst.to_vec().unwrap(), &want)
                        .unwrap_or_else(|e| panic!("worker {worker}, round {round}: {e}"));
                };
                for round in 0..60i32 {
                    let n = 1 + (round as usize * 104_729 + worker as usize * 7919) % (3 << 20);
                    let pattern: Vec<i32> =
                        (0..n as i32).map(|j| j.wrapping_mul(31) ^ (worker << 24 | round)).collect();
                    let mut src = Tensor::<i32>::empty_with(a, &main, &[n]).unwrap();
                    src.copy_from(&pattern).unwrap();
                    let mut dst = Tensor::<i32>::empty_with(a, &stream, &[n]).unwrap();
                    hold(&stream, 5);
                    launch_copy_plus_one(f, &stream, &mut dst, &src);
                    drop(src); // the kernel has not read it yet
                    outs.push_back((round, dst, pattern.iter().map(|v| v + 1).collect::<Vec<_>>()));
                    if outs.len() > 4 {
                        let (r, dst, want) = outs.pop_front().unwrap();
                        check(r, dst, want);
                    }
                }
                for (r, dst, want) in outs {
                    check(r, dst, want);
                }
            });
        }
        let (a, ctx, finished) = (&a, &ctx, &finished);
        s.spawn(move || {
            let main = ctx.default_stream();
            let mut rng = Lcg(7);
            let mut live: Vec<Tensor<i32>> = Vec::new();
            let mut made = 0usize;
            while finished.load(Ordering::SeqCst) < 2 {
                let n = 1 + rng.next() as usize % (3 << 20);
                let mut t = Tensor::<i32>::empty_with(a, &main, &[n]).unwrap();
                t.fill_ones().unwrap(); // overwrites whatever the block held
                live.push(t);
                if live.len() > 8 {
                    let i = rng.next() as usize % live.len();
                    live.swap_remove(i);
                }
                made += 1;
            }
            main.synchronize().unwrap();
            println!("the allocating thread made {made} tensors meanwhile");
        });
    });
    ctx.synchronize().expect("no illegal-address error");
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
}

/// A tensor used on a stream that the program drops before the tensor: the allocator's device
/// holds the stream (it was registered when the use was recorded), so the free records its
/// event on a live stream, and the block still waits for the copy.
fn gpu_a_stream_dropped_before_the_tensor_used_on_it_is_still_waited_for() {
    let dev = gpu();
    let ctx = dev.context().clone();
    let a = allocator(dev.clone(), "");
    let main = ctx.new_stream().unwrap();
    let n = 16 << 20;
    let pattern: Vec<i32> = (0..n as i32).map(|i| i.wrapping_mul(-1640531527)).collect();
    let mut x = Tensor::<i32>::empty_with(&a, &main, &[n]).unwrap();
    x.copy_from(&pattern).unwrap();
    let mut y = Tensor::<i32>::empty_with(&a, &main, &[n]).unwrap();
    let old = x.as_ptr();
    let registered = dev.registered_streams();
    {
        let side = ctx.new_stream().unwrap();
        x.record_stream(&side).unwrap();
        y.record_stream(&side).unwrap();
        assert_eq!(dev.registered_streams(), registered + 1);
        hold(&side, 300);
        side.memcpy_dtod(&x, &mut y).unwrap();
    } // the program's last handle on the side stream
    drop(x); // records an event on the side stream, which the device still holds
    let z = Tensor::<i32>::empty_with(&a, &main, &[n]).unwrap();
    assert_ne!(z.as_ptr(), old, "x's block must wait for the copy on the dropped stream");
    ctx.synchronize().unwrap();
    same(&y.to_vec().unwrap(), &pattern).unwrap();
    drop((y, z));
    a.empty_cache().unwrap();
    assert_eq!(a.memory_reserved(), 0);
}

/// `CudaDevice` hands the driver only streams and events it knows: any other id is an
/// `InvalidHandle` error (it used to be cast to a driver handle).
fn gpu_cuda_device_refuses_ids_it_does_not_know() {
    let dev = gpu();
    let ctx = dev.context().clone();
    let invalid = |r: Result<(), DeviceError>, what: &str| match r {
        Err(DeviceError::InvalidHandle { what: w, .. }) if w == what => {}
        other => panic!("expected an unknown {what}, got {other:?}"),
    };
    let bogus = EventId(u64::MAX - 1);
    invalid(dev.record_event(bogus, StreamId::DEFAULT), "event");
    invalid(dev.query_event(bogus).map(drop), "event");
    invalid(dev.synchronize_event(bogus), "event");
    invalid(dev.destroy_event(bogus), "event");
    let e = dev.create_event().unwrap();
    assert_eq!(dev.live_events(), 1);
    dev.record_event(e, StreamId::DEFAULT).unwrap();
    dev.synchronize_event(e).unwrap();
    assert!(dev.query_event(e).unwrap());
    let stranger = StreamId(0xbad0);
    invalid(dev.record_event(e, stranger), "stream");
    invalid(dev.synchronize_stream(stranger), "stream");
    invalid(dev.check_stream(stranger), "stream");
    dev.destroy_event(e).unwrap();
    invalid(dev.query_event(e).map(drop), "event");
    invalid(dev.destroy_event(e), "event");
    assert_eq!(dev.live_events(), 0);

    assert_eq!(dev.stream_id(&ctx.default_stream()).unwrap(), StreamId::DEFAULT);
    let side = ctx.new_stream().unwrap();
    assert_eq!(dev.registered_stream_id(&side), None);
    let id = dev.stream_id(&side).unwrap();
    assert_eq!(id, StreamId(side.cu_stream() as u64));
    assert_eq!(dev.stream_id(&side).unwrap(), id, "the same stream, the same id");
    assert_eq!(dev.registered_stream_id(&side), Some(id));
    let e = dev.create_event().unwrap();
    dev.record_event(e, id).unwrap();
    dev.synchronize_stream(id).unwrap();
    dev.destroy_event(e).unwrap();

    let a = allocator(dev.clone(), "");
    let p = a.malloc(1 << 20, StreamId::DEFAULT).unwrap();
    let r = a.record_stream(p, stranger);
    assert!(matches!(r, Err(AllocError::Device(DeviceError::InvalidHandle { what: "stream", .. }))), "{r:?}");
    a.record_stream(p, id).unwrap();
    a.free(p).unwrap();
    a.empty_cache().unwrap();

    // a stream of another context is refused, not registered
    let other = cudarc::driver::CudaContext::new_non_primary(0, 0).unwrap();
    let foreign = other.new_stream().unwrap();
    invalid(dev.stream_id(&foreign).map(drop), "stream");
    drop((foreign, other));
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
