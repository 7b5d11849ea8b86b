//! `gpumem bench`: the cost of a cache hit per policy, throughput across threads, and (on a
//! GPU) the cost of the device calls the policies make.

use crate::args::{BenchArgs, DeviceChoice};
use crate::Failure;
use gpumem::{Allocator, CudaDevice, Device, Policy, SimDevice, StreamId};
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;

#[derive(Serialize)]
struct Row {
    bench: String,
    policy: String,
    device: &'static str,
    value: f64,
    unit: &'static str,
}

/// ns per alloc+free pair of `size` bytes on a warm cache.
fn hit_ns<D: Device>(a: &Allocator<D>, size: u64, stream: StreamId) -> Result<f64, Failure> {
    let warm = a.malloc(size, stream).map_err(Failure::work)?;
    a.free(warm).map_err(Failure::work)?;
    let n = 200_000;
    let t = Instant::now();
    for _ in 0..n {
        let p = a.malloc(size, stream).map_err(Failure::work)?;
        a.free(p).map_err(Failure::work)?;
    }
    Ok(t.elapsed().as_nanos() as f64 / n as f64)
}

/// `hit_ns` on a busy cache: 2,000 blocks of 4-100 KiB allocated and every other one freed
/// first, so that the free lists hold a thousand holes, as a real program's do (on an empty
/// cache every lookup is trivially short).
fn busy_hit_ns<D: Device>(a: &Allocator<D>, size: u64) -> Result<f64, Failure> {
    let mut kept = Vec::new();
    for i in 0..2000u64 {
        let p = a.malloc(4096 + (i % 97) * 1024, StreamId::DEFAULT).map_err(Failure::work)?;
        if i % 2 == 0 {
            a.free(p).map_err(Failure::work)?;
        } else {
            kept.push(p);
        }
    }
    let v = hit_ns(a, size, StreamId::DEFAULT)?;
    for p in kept {
        a.free(p).map_err(Failure::work)?;
    }
    Ok(v)
}

/// Alloc+free pairs per thread in `throughput` (PyTorch's `threads_pairs_per_s` makes 200,000
/// in `../shared/bench/torch_alloc_bench.py`; half as many keep `scripts/gpu-perf.sh`'s three
/// rounds within its time while 8 threads still share one lock).
const THREAD_PAIRS: usize = 100_000;

/// Million alloc+free pairs per second in total, with thread `i` on `streams[i]`; the sizes
/// are PyTorch's in `threads_pairs_per_s`: 64 KiB times the thread's number plus one.
fn throughput<D: Device + 'static>(a: &Arc<Allocator<D>>, streams: &[StreamId]) -> Result<f64, Failure> {
    let threads = streams.len();
    // every thread's first pair grows the cache: not part of the measure
    for (i, &stream) in streams.iter().enumerate() {
        let p = a.malloc((i as u64 + 1) << 16, stream).map_err(Failure::work)?;
        a.free(p).map_err(Failure::work)?;
    }
    let start = Arc::new(std::sync::Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (a, start) = (a.clone(), start.clone());
            let stream = streams[i];
            std::thread::spawn(move || {
                let size = (i as u64 + 1) << 16;
                start.wait();
                for _ in 0..THREAD_PAIRS {
                    let p = a.malloc(size, stream).expect("cache hit");
                    a.free(p).expect("own pointer");
                }
            })
        })
        .collect();
    start.wait();
    let t = Instant::now();
    for h in handles {
        h.join().map_err(|_| Failure::Work("a bench thread panicked".into()))?;
    }
    Ok((threads * THREAD_PAIRS) as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// The thread benches: 1, 2, 4, ... threads each on its own stream (`threads_N`), and the
/// same counts all on one stream (`threads_N_one_stream`), with each figure's ratio to one
/// thread's (`scaling_*`, what issue 20 asks of 8 threads: at least 4x on own streams, at
/// least 1x on one stream).
fn thread_benches<D: Device + 'static>(
    a: &Arc<Allocator<D>>,
    name: &str,
    device: &'static str,
    streams: &[StreamId],
    quick: bool,
    rows: &mut Vec<Row>,
) -> Result<(), Failure> {
    let row = |bench: String, value: f64, unit: &'static str| Row {
        bench,
        policy: name.to_string(),
        device,
        value,
        unit,
    };
    let one = throughput(a, &streams[..1])?;
    rows.push(row("threads_1".into(), one, "M pairs/s"));
    let mut t = if quick { streams.len() } else { 2 };
    while t <= streams.len() && t > 1 {
        let own = throughput(a, &streams[..t])?;
        let shared = throughput(a, &vec![streams[0]; t])?;
        rows.push(row(format!("threads_{t}"), own, "M pairs/s"));
        rows.push(row(format!("threads_{t}_one_stream"), shared, "M pairs/s"));
        rows.push(row(format!("scaling_{t}_streams"), own / one, "x"));
        rows.push(row(format!("scaling_{t}_one_stream"), shared / one, "x"));
        t *= 2;
    }
    Ok(())
}

/// How the allocator benches run: on which device, with which streams (`streams[i]` is the
/// stream of thread `i`: real streams on a GPU, where unmapping synchronizes the streams
/// that used the memory), and whether only issue 20's figures are wanted.
struct Setup<'a, D> {
    make: &'a dyn Fn() -> Result<D, Failure>,
    device: &'static str,
    streams: &'a [StreamId],
    quick: bool,
    json: bool,
}

/// The allocator benches of every policy; each policy's rows print as soon as they are
/// measured, so that a run cut short by a time limit keeps what it measured.
fn allocator_benches<D: Device + 'static>(s: &Setup<D>, policies: &[String]) -> Result<(), Failure> {
    for name in policies {
        let mut rows = Vec::new();
        policy_benches(s, name, &mut rows)?;
        print_rows(&rows, s.json);
    }
    Ok(())
}

/// One policy's rows: the hit pairs (only the busy one with `--quick`), then the threads.
fn policy_benches<D: Device + 'static>(s: &Setup<D>, name: &str, rows: &mut Vec<Row>) -> Result<(), Failure> {
    let (device, streams) = (s.device, s.streams);
    let policy = Policy::parse(name).map_err(Failure::input)?;
    let a = Arc::new(Allocator::with_policy((s.make)()?, &policy).map_err(Failure::work)?);
    let sizes: &[(&str, u64)] =
        if s.quick { &[] } else { &[("512B", 512), ("1MiB", 1 << 20), ("64MiB", 64 << 20)] };
    for &(label, size) in sizes {
        let v = hit_ns(&a, size, StreamId::DEFAULT)?;
        rows.push(Row {
            bench: format!("hit_pair_{label}"),
            policy: name.to_string(),
            device,
            value: v,
            unit: "ns/pair",
        });
    }
    rows.push(Row {
        bench: "hit_pair_1MiB_busy".into(),
        policy: name.to_string(),
        device,
        value: busy_hit_ns(&a, 1 << 20)?,
        unit: "ns/pair",
    });
    thread_benches(&a, name, device, streams, s.quick, rows)?;
    a.empty_cache().map_err(Failure::work)?;
    Ok(())
}

fn print_rows(rows: &[Row], json: bool) {
    for r in rows {
        if json {
            println!("{}", serde_json::to_string(r).expect("rows serialize"));
        } else {
            println!("{:<28} {:<17} {:<5} {:>12.2} {}", r.bench, r.policy, r.device, r.value, r.unit);
        }
    }
}

/// µs per device call, averaged over `n`.
fn time_us(n: usize, mut f: impl FnMut(usize) -> Result<(), Failure>) -> Result<f64, Failure> {
    let t = Instant::now();
    for i in 0..n {
        f(i)?;
    }
    Ok(t.elapsed().as_secs_f64() * 1e6 / n as f64)
}

/// Microseconds per remap of `n` chunks of `size` bytes mapped at `va`, each keeping the 2 MiB
/// pages at `offsets`: staged through `stage` (a page of it per kept page), or, without one,
/// copied between two allocations held at once.
fn time_remaps(
    d: &CudaDevice,
    va: u64,
    size: u64,
    n: usize,
    offsets: &[u64],
    stage: Option<u64>,
) -> Result<f64, Failure> {
    const PAGE: u64 = 2 << 20;
    let base = |i: usize| va + i as u64 * size;
    for i in 0..n {
        d.map(base(i), size).map_err(Failure::work)?;
    }
    let r = time_us(n, |i| {
        let keep: Vec<(u64, u64)> = offsets.iter().map(|&o| (base(i) + o, PAGE)).collect();
        let done = match stage {
            Some(stage) => {
                let save: Vec<(u64, u64, u64)> =
                    keep.iter().zip(0..).map(|(&(p, _), k)| (p, stage + k * PAGE, PAGE)).collect();
                d.remap_staged(base(i), size, &keep, &save)
            }
            None => d.remap(base(i), size, &keep),
        };
        done.map_err(Failure::work)
    })?;
    // a staged remap's copies back may still run: wait before unmapping their target
    d.synchronize_device().map_err(Failure::work)?;
    for i in 0..n {
        for &o in offsets {
            d.unmap(base(i) + o, PAGE).map_err(Failure::work)?;
        }
    }
    Ok(r)
}

fn device_benches(d: &CudaDevice, rows: &mut Vec<Row>) -> Result<(), Failure> {
    const MIB: u64 = 1 << 20;
    let mut put = |bench: String, value: f64| {
        rows.push(Row { bench, policy: "-".into(), device: "cuda", value, unit: "us/call" })
    };
    for size in [2 * MIB, 400 * MIB] {
        let mut ptrs = Vec::new();
        let a = time_us(16, |_| {
            ptrs.push(d.malloc(size).map_err(Failure::work)?);
            Ok(())
        })?;
        let f = time_us(16, |i| d.free(ptrs[i]).map_err(Failure::work))?;
        put(format!("cuMemAlloc_{}MiB", size / MIB), a);
        put(format!("cuMemFree_{}MiB", size / MIB), f);
    }
    let va = d.reserve(8 << 30).map_err(Failure::work)?;
    for (size, n) in [(2 * MIB, 128usize), (32 * MIB, 32), (256 * MIB, 8), (1024 * MIB, 4)] {
        let m = time_us(n, |i| d.map(va + i as u64 * size, size).map_err(Failure::work))?;
        d.synchronize_stream(StreamId::DEFAULT).map_err(Failure::work)?;
        let u = time_us(n, |i| d.unmap(va + i as u64 * size, size).map_err(Failure::work))?;
        put(format!("map_{}MiB", size / MIB), m);
        put(format!("unmap_{}MiB", size / MIB), u);
    }
    // compaction: a chunk shrunk to the page under one live block (a new allocation), the
    // page copied between two allocations held at once, or staged in free mapped memory
    // (Note [The copy's memory]); then staged, keeping four separate pages
    let stage = va + (7 << 30);
    d.map(stage, 8 * MIB).map_err(Failure::work)?;
    for (size, n) in [(32 * MIB, 16usize), (256 * MIB, 8)] {
        for (name, staged) in [("remap", false), ("remap_staged", true)] {
            let r = time_remaps(d, va, size, n, &[size / 2], staged.then_some(stage))?;
            put(format!("{name}_{}MiB_keep_2MiB", size / MIB), r);
        }
    }
    let four = [0, 8 * MIB, 16 * MIB, 24 * MIB];
    put("remap_staged_32MiB_keep_4x2MiB".into(), time_remaps(d, va, 32 * MIB, 16, &four, Some(stage))?);
    d.unmap(stage, 8 * MIB).map_err(Failure::work)?;
    d.unreserve(va, 8 << 30).map_err(Failure::work)?;
    let e = d.create_event().map_err(Failure::work)?;
    let r = time_us(1000, |_| d.record_event(e, StreamId::DEFAULT).map_err(Failure::work))?;
    let q = time_us(1000, |_| d.query_event(e).map(|_| ()).map_err(Failure::work))?;
    let s = time_us(100, |_| d.synchronize_stream(StreamId::DEFAULT).map_err(Failure::work))?;
    put("cuEventRecord".into(), r);
    put("cuEventQuery".into(), q);
    put("cuStreamSynchronize_idle".into(), s);
    d.destroy_event(e).map_err(Failure::work)?;
    Ok(())
}

pub(crate) fn run(a: &BenchArgs) -> Result<(), Failure> {
    let mut rows = Vec::new();
    let policies: Vec<String> = if a.policies.is_empty() {
        Policy::NAMES.iter().map(|s| s.to_string()).collect()
    } else {
        for p in &a.policies {
            Policy::parse(p).map_err(Failure::input)?;
        }
        a.policies.clone()
    };
    let use_cuda = match a.device {
        DeviceChoice::Sim => false,
        DeviceChoice::Cuda => true,
        DeviceChoice::Auto => match CudaDevice::new(0) {
            Ok(_) => true,
            Err(e) => {
                // on stderr: stdout may be JSON
                eprintln!("gpumem: no GPU here ({e}): measuring on the simulated device instead");
                false
            }
        },
    };
    if use_cuda {
        let dev = CudaDevice::new(0).map_err(Failure::work)?;
        let owned: Vec<_> = (0..a.threads)
            .map(|_| dev.context().new_stream())
            .collect::<Result<_, _>>()
            .map_err(|e| Failure::work(format!("{e:?}")))?;
        let streams: Vec<StreamId> =
            owned.iter().map(|s| dev.stream_id(s)).collect::<Result<_, _>>().map_err(Failure::work)?;
        let make = || Ok(dev.clone());
        let setup = Setup { make: &make, device: "cuda", streams: &streams, quick: a.quick, json: a.json };
        allocator_benches(&setup, &policies)?;
        if !a.no_device_calls && !a.quick {
            device_benches(&dev, &mut rows)?;
        }
    } else {
        let streams: Vec<StreamId> = (0..a.threads as u64).map(|i| StreamId(0x1000 + i)).collect();
        let make = || Ok(SimDevice::default());
        let setup = Setup { make: &make, device: "sim", streams: &streams, quick: a.quick, json: a.json };
        allocator_benches(&setup, &policies)?;
    }
    print_rows(&rows, a.json);
    Ok(())
}
