//! `gpumem demo`: the PyTorch tutorial "How to clear GPU memory", step by step.

use crate::args::{DemoArgs, DeviceChoice};
use crate::Failure;
use gpumem::{format_size, Allocator, AllocatorConfig, Device, Policy, SimDevice, StreamId};
use gpumem_trace::{ReplayError, ReplayOptions, ReplayReport, Trace};

/// Replays on the real GPU (not available in this build yet: see `CudaDevice`).
pub(crate) fn replay_on_cuda(
    _trace: &Trace,
    _policy: &Policy,
    _opts: &ReplayOptions,
    _tick: &mut dyn FnMut(u64, u64),
) -> Result<Result<ReplayReport, ReplayError>, Failure> {
    Err(Failure::Work("--device cuda: no CUDA driver was found on this machine; use --device sim".into()))
}

fn mb(b: u64) -> String {
    format!("{:.2} MB ({})", b as f64 / 1e6, format_size(b))
}

fn walk<D: Device>(alloc: &Allocator<D>, device_name: &str) -> Result<(), Failure> {
    let work = |e: gpumem::AllocError| Failure::Work(e.to_string());
    let free = |a: &Allocator<D>| a.mem_get_info().map(|(f, _)| f).map_err(work);
    let show = |a: &Allocator<D>, free_now: u64| {
        println!("   memory_allocated() = {}", mb(a.memory_allocated()));
        println!("   memory_reserved()  = {}", mb(a.memory_reserved()));
        println!("   driver free memory = {}", mb(free_now));
    };
    println!("How to clear GPU memory, on the {device_name}\n");
    let free0 = free(alloc)?;
    println!("0. Before anything: driver free memory = {}\n", mb(free0));
    println!("1. x = torch.randn(10000, 10000, device='cuda')   # 10^8 float32 values, 400,000,000 bytes");
    let x = alloc.malloc(10000 * 10000 * 4, StreamId::DEFAULT).map_err(work)?;
    show(alloc, free(alloc)?);
    println!("   (PyTorch rounds the segment to 2 MiB pages and counts the unsplit tail as allocated)\n");
    println!("2. torch.cuda.empty_cache() while x is alive: the pitfall, nothing is freed");
    alloc.empty_cache().map_err(work)?;
    show(alloc, free(alloc)?);
    println!();
    println!("3. del x: the tensor is gone, but its memory stays in the cache for the next tensor");
    alloc.free(x).map_err(work)?;
    show(alloc, free(alloc)?);
    println!();
    println!("4. torch.cuda.empty_cache(): the cached memory goes back to the GPU");
    alloc.empty_cache().map_err(work)?;
    let free4 = free(alloc)?;
    show(alloc, free4);
    println!(
        "   driver free memory is {} where it began\n",
        if free4 == free0 { "back" } else { "NOT back" }
    );
    println!("Quick reference (torch.cuda ~ gpumem):");
    println!("  memory_allocated()        bytes held by live tensors");
    println!("  memory_reserved()         bytes held by the cache (live + cached)");
    println!("  max_memory_allocated()    peak of memory_allocated()");
    println!("  max_memory_reserved()     peak of memory_reserved()");
    println!("  reset_peak_memory_stats() start peaks afresh");
    println!("  empty_cache()             give cached, unused memory back to the GPU");
    println!("  mem_get_info()            the driver's free and total memory");
    println!("  memory_summary()          the whole table; memory_stats() every counter");
    println!("  del x / drop(x)           free a tensor: its memory returns to the cache, not the GPU");
    Ok(())
}

pub(crate) fn run(a: &DemoArgs) -> Result<(), Failure> {
    match a.device {
        DeviceChoice::Cuda => Err(Failure::Work(
            "no CUDA driver (libcuda) was found on this machine; run `gpumem demo --device sim`".into(),
        )),
        DeviceChoice::Auto | DeviceChoice::Sim => {
            if a.device == DeviceChoice::Auto {
                println!("No GPU found (no CUDA driver on this machine): running on the simulated device.\n");
            }
            let config = AllocatorConfig::from_env().map_err(|e| Failure::Input(e.to_string()))?;
            let alloc =
                Allocator::new(SimDevice::default(), config).map_err(|e| Failure::Work(e.to_string()))?;
            walk(&alloc, "simulated GPU (80 GB, no real memory)")
        }
    }
}
