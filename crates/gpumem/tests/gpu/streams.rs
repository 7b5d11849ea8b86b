//! GPU tests of streams and threads: kernels on other streams, threads that launch while
//! another allocates, streams dropped before the tensors used on them, and ids the device
//! does not know.

use crate::{allocator, gpu, Lcg};
use cudarc::driver::{CudaFunction, CudaStream, LaunchConfig, PushKernelArg};
use gpumem::{
    AllocError, Allocator, AllocatorConfig, CudaAllocator, CudaDevice, Device, DeviceError, EventId,
    PolicyKind, StreamId, Tensor,
};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

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
pub(crate) fn gpu_gpumem_side_stream_reads_while_the_main_stream_repeats_a_step() {
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
pub(crate) fn gpu_gpumem_kernels_on_two_threads_while_a_third_allocates() {
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
pub(crate) fn gpu_a_stream_dropped_before_the_tensor_used_on_it_is_still_waited_for() {
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
pub(crate) fn gpu_cuda_device_refuses_ids_it_does_not_know() {
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
