//! `gpumem demo`: the PyTorch tutorial "How to clear GPU memory", step by step.

use crate::args::{DemoArgs, DeviceChoice};
use crate::Failure;
use gpumem::{
    format_size, AllocError, Allocator, AllocatorConfig, CudaDevice, Device, DeviceError, Policy, PolicyKind,
    SimDevice, StreamId, Tensor,
};
use std::sync::Arc;

/// The "tensor" of step 1: a real one on the GPU, a bare block on the simulated device.
enum X<D: Device> {
    /// Held only for its `Drop`, which frees the block.
    Cuda(#[allow(dead_code)] Tensor<f32>),
    Block(Arc<Allocator<D>>, u64),
}

impl<D: Device> Drop for X<D> {
    fn drop(&mut self) {
        if let X::Block(a, p) = self {
            let _ = a.free(*p);
        }
    }
}

fn mb(b: u64) -> String {
    format!("{:.2} MB = {}", b as f64 / 1e6, format_size(b))
}

fn walk<D: Device>(
    alloc: &Arc<Allocator<D>>,
    device_name: &str,
    make_x: impl FnOnce() -> Result<X<D>, AllocError>,
) -> Result<(), Failure> {
    let free = |a: &Allocator<D>| a.mem_get_info().map(|(f, _)| f).map_err(Failure::work);
    let show = |a: &Allocator<D>| -> Result<(), Failure> {
        println!("   memory_allocated() = {}", mb(a.memory_allocated()));
        println!("   memory_reserved()  = {}", mb(a.memory_reserved()));
        println!("   driver free memory = {}", mb(free(a)?));
        Ok(())
    };
    println!("How to clear GPU memory, on the {device_name}, policy {}\n", Policy::kind_name(alloc.policy()));
    let free0 = free(alloc)?;
    println!("0. Before anything: driver free memory = {}\n", mb(free0));
    println!("1. x = torch.randn(10000, 10000, device='cuda')");
    let x = make_x().map_err(Failure::work)?;
    show(alloc)?;
    let requested = alloc.stats().requested_bytes.all().current as u64;
    if requested != alloc.memory_allocated() {
        println!("   (x asked for {}; the policy's rounding counts the rest as allocated)", mb(requested));
    }
    println!();
    println!("2. torch.cuda.empty_cache() while x is alive: the pitfall, nothing is freed");
    alloc.empty_cache().map_err(Failure::work)?;
    show(alloc)?;
    println!();
    println!("3. del x: the tensor is gone, but its memory stays cached for the next tensor");
    drop(x);
    show(alloc)?;
    println!();
    println!("4. torch.cuda.empty_cache(): the cached memory goes back to the GPU");
    alloc.empty_cache().map_err(Failure::work)?;
    show(alloc)?;
    let free4 = free(alloc)?;
    println!(
        "   driver free memory is {} ({} before, {} now)\n",
        if free4 == free0 { "back where it began" } else { "NOT back where it began" },
        free0,
        free4
    );
    println!("Quick reference (torch.cuda -> gpumem):");
    println!("  memory_allocated()        bytes held by live tensors");
    println!("  memory_reserved()         bytes held by the cache (live tensors + cached blocks)");
    println!("  max_memory_allocated()    peak of memory_allocated()");
    println!("  max_memory_reserved()     peak of memory_reserved()");
    println!("  reset_peak_memory_stats() start the peaks afresh");
    println!("  empty_cache()             give cached, unused memory back to the GPU");
    println!("  mem_get_info()            the driver's free and total memory");
    println!("  memory_summary()          the whole table; memory_stats() every counter");
    println!("  del x / drop(x)           free a tensor: its memory returns to the cache, not to the GPU");
    println!("  nvidia-smi shows more     the CUDA context and libraries; no cache call frees those");
    Ok(())
}

/// The options of `GPUMEM_ALLOC_CONF`, with the gpumem policy unless they name another.
fn config() -> Result<AllocatorConfig, Failure> {
    let mut c = AllocatorConfig::from_env().map_err(Failure::input)?;
    c.settle_policy(PolicyKind::Gpumem).map_err(Failure::input)?;
    Ok(c)
}

fn on_cuda(dev: CudaDevice) -> Result<(), Failure> {
    let name = format!("GPU {} ({})", dev.index(), dev.name());
    let alloc = Arc::new(Allocator::new(dev.clone(), config()?).map_err(Failure::work)?);
    let stream = dev.context().default_stream();
    // cuRAND loads its kernels into device memory at first use, outside any cache; load it
    // now so that step 0 measures the GPU as the walk-through leaves it.
    let mut warm = Tensor::<f32>::empty_with(&alloc, &stream, &[2]).map_err(Failure::work)?;
    warm.fill_randn(0).map_err(Failure::work)?;
    drop(warm);
    alloc.empty_cache().map_err(Failure::work)?;
    alloc.reset_peak_memory_stats();
    alloc.reset_accumulated_memory_stats();
    println!("(cuRAND was loaded first: its kernels take device memory that no cache manages)");
    walk(&alloc, &name, || {
        let mut t = Tensor::<f32>::empty_with(&alloc, &stream, &[10000, 10000])?;
        t.fill_randn(0)?;
        stream.synchronize().map_err(|e| {
            AllocError::Device(DeviceError::Driver { call: "cuStreamSynchronize", message: format!("{e:?}") })
        })?;
        Ok(X::Cuda(t))
    })
}

fn on_sim() -> Result<(), Failure> {
    let alloc = Arc::new(Allocator::new(SimDevice::default(), config()?).map_err(Failure::work)?);
    let a = alloc.clone();
    walk(&alloc, "simulated GPU (80 GB; no real memory is touched)", move || {
        let p = a.malloc(10000 * 10000 * 4, StreamId::DEFAULT)?;
        Ok(X::Block(a, p))
    })
}

pub(crate) fn run(a: &DemoArgs) -> Result<(), Failure> {
    match a.device {
        DeviceChoice::Sim => on_sim(),
        DeviceChoice::Cuda => on_cuda(CudaDevice::new(0).map_err(Failure::work)?),
        DeviceChoice::Auto => match CudaDevice::new(0) {
            Ok(dev) => on_cuda(dev),
            Err(e) => {
                println!("No GPU here ({e}): running on the simulated device instead.\n");
                on_sim()
            }
        },
    }
}
