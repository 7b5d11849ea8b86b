//! A small typed tensor over the allocator, so that Rust code reads like the PyTorch code it
//! mirrors. It is not a tensor library: it allocates, fills, copies to and from the host, and
//! frees its block when dropped.
//!
//! It implements cudarc's device-pointer traits, so a gpumem tensor can be passed to cudarc
//! copies (`memcpy_htod`, `memcpy_dtoh`) and cuRAND, and, through [`Tensor::on`], to kernel
//! launches: gpumem then serves as the allocator of a cudarc program.
//!
//! Note [Uses on other streams]
//! ----------------------------
//! A block freed while another stream may still read or write it must not be handed out
//! again before that stream is done. Every way into a tensor's memory from another stream
//! therefore leaves a trace:
//! - [`Tensor::record_stream`] and [`Tensor::on`]/[`Tensor::on_mut`] (kernel arguments) take
//!   the stream as an `Arc`: they register it with the allocator's device
//!   ([`crate::CudaDevice::stream_id`], which holds it from then on) and record the use, so
//!   the free waits for an event on that stream even if the program dropped the stream first.
//! - cudarc's copies reach the tensor through `DevicePtr`, which sees only a reference to the
//!   stream. A use on a stream registered with the device is recorded as above; on any other
//!   stream the call waits for that stream before it returns (cudarc's `SyncOnDrop::Sync`),
//!   so nothing of it is left to wait for at the free.
//! - Kernel launches: cudarc's launch arguments do not say which stream they are for, so a
//!   tensor is not itself a kernel argument; `tensor.on(&stream)` is, and records the use
//!   where `stream` is not the tensor's own.

use crate::device::DeviceError;
use crate::error::AllocError;
use crate::global::{allocator, CudaAllocator};
use cudarc::driver::{
    CudaStream, DevicePtr, DevicePtrMut, DeviceRepr, DeviceSlice, LaunchArgs, PushKernelArg, SyncOnDrop,
};
use std::marker::PhantomData;
use std::sync::Arc;

/// How `ones` fills an element type.
#[doc(hidden)]
pub enum OnesFill {
    /// `cuMemsetD8` with this pattern.
    D8(u8),
    /// `cuMemsetD16` with this pattern.
    D16(u16),
    /// `cuMemsetD32` with this pattern.
    D32(u32),
    /// A copy from the host.
    Host,
}

/// An element type a [`Tensor`] can hold: f32, f16, bf16, i32, i64, u8.
pub trait Element:
    DeviceRepr + cudarc::driver::ValidAsZeroBits + Copy + Default + Send + Sync + 'static
{
    /// PyTorch's name for the dtype.
    const DTYPE: &'static str;
    /// The value one.
    fn one() -> Self;
    #[doc(hidden)]
    fn ones_fill() -> OnesFill;
}

/// Floating-point element types, which `randn` can fill.
pub trait FloatElement: Element {
    /// Converts from f32.
    fn from_f32(x: f32) -> Self;
}

impl Element for f32 {
    const DTYPE: &'static str = "float32";
    fn one() -> Self {
        1.0
    }
    fn ones_fill() -> OnesFill {
        OnesFill::D32(1.0f32.to_bits())
    }
}
impl FloatElement for f32 {
    fn from_f32(x: f32) -> Self {
        x
    }
}
impl Element for half::f16 {
    const DTYPE: &'static str = "float16";
    fn one() -> Self {
        half::f16::ONE
    }
    fn ones_fill() -> OnesFill {
        OnesFill::D16(half::f16::ONE.to_bits())
    }
}
impl FloatElement for half::f16 {
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
}
impl Element for half::bf16 {
    const DTYPE: &'static str = "bfloat16";
    fn one() -> Self {
        half::bf16::ONE
    }
    fn ones_fill() -> OnesFill {
        OnesFill::D16(half::bf16::ONE.to_bits())
    }
}
impl FloatElement for half::bf16 {
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
}
impl Element for i32 {
    const DTYPE: &'static str = "int32";
    fn one() -> Self {
        1
    }
    fn ones_fill() -> OnesFill {
        OnesFill::D32(1)
    }
}
impl Element for u8 {
    const DTYPE: &'static str = "uint8";
    fn one() -> Self {
        1
    }
    fn ones_fill() -> OnesFill {
        OnesFill::D8(1)
    }
}
impl Element for i64 {
    const DTYPE: &'static str = "int64";
    fn one() -> Self {
        1
    }
    fn ones_fill() -> OnesFill {
        OnesFill::Host
    }
}

/// A block of GPU memory holding `shape` elements of `T`, allocated on a stream. Dropping it
/// frees the block into the cache.
pub struct Tensor<T: Element> {
    ptr: u64,
    len: usize,
    shape: Vec<usize>,
    stream: Arc<CudaStream>,
    alloc: Arc<CudaAllocator>,
    _t: PhantomData<T>,
}

fn driver(call: &'static str, e: impl std::fmt::Debug) -> AllocError {
    AllocError::Device(DeviceError::Driver { call, message: format!("{e:?}") })
}

fn numel(shape: &[usize]) -> Result<usize, AllocError> {
    shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(|| AllocError::InvalidArgument(format!("shape {shape:?} has too many elements")))
}

impl<T: Element> Tensor<T> {
    /// An uninitialized tensor on GPU 0's default stream (`torch.empty(shape, device='cuda')`).
    pub fn empty(shape: &[usize]) -> Result<Tensor<T>, AllocError> {
        let a = allocator(0)?;
        let stream = a.with_device(|d| d.context().default_stream());
        Tensor::empty_with(&a, &stream, shape)
    }

    /// An uninitialized tensor from `alloc`, for use on `stream`.
    pub fn empty_with(
        alloc: &Arc<CudaAllocator>,
        stream: &Arc<CudaStream>,
        shape: &[usize],
    ) -> Result<Tensor<T>, AllocError> {
        let len = numel(shape)?;
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| AllocError::InvalidArgument(format!("shape {shape:?} is too large")))?;
        // registered, so that no later stream can take over this one's id and its cached
        // blocks (Note [Stream and event ids are not handles] in `device/mod.rs`)
        let id = alloc.with_device(|d| d.stream_id(stream))?;
        let ptr = alloc.malloc(bytes as u64, id)?;
        Ok(Tensor {
            ptr,
            len,
            shape: shape.to_vec(),
            stream: stream.clone(),
            alloc: alloc.clone(),
            _t: PhantomData,
        })
    }

    /// A tensor of zeros on GPU 0.
    pub fn zeros(shape: &[usize]) -> Result<Tensor<T>, AllocError> {
        let mut t = Tensor::empty(shape)?;
        t.fill_zeros()?;
        Ok(t)
    }

    /// A tensor of ones on GPU 0.
    pub fn ones(shape: &[usize]) -> Result<Tensor<T>, AllocError> {
        let mut t = Tensor::empty(shape)?;
        t.fill_ones()?;
        Ok(t)
    }

    /// A tensor holding a copy of `data`, which must have `shape`'s element count.
    pub fn from_slice(data: &[T], shape: &[usize]) -> Result<Tensor<T>, AllocError> {
        if numel(shape)? != data.len() {
            return Err(AllocError::InvalidArgument(format!(
                "{} values do not fill shape {shape:?}",
                data.len()
            )));
        }
        let mut t = Tensor::empty(shape)?;
        t.copy_from(data)?;
        Ok(t)
    }

    /// Sets every byte to zero.
    pub fn fill_zeros(&mut self) -> Result<(), AllocError> {
        if self.len == 0 {
            return Ok(());
        }
        let stream = self.stream.clone();
        stream.memset_zeros(self).map_err(|e| driver("cuMemsetD8Async", e))
    }

    /// Sets every element to one.
    pub fn fill_ones(&mut self) -> Result<(), AllocError> {
        use cudarc::driver::sys;
        if self.len == 0 {
            return Ok(());
        }
        self.alloc.with_device(|d| d.context().bind_to_thread()).map_err(|e| driver("cuCtxSetCurrent", e))?;
        let s = self.stream.cu_stream();
        // SAFETY: ptr..ptr+len elements is this tensor's block; the stream is its own.
        let r = unsafe {
            match T::ones_fill() {
                OnesFill::D8(v) => sys::cuMemsetD8Async(self.ptr, v, self.len, s),
                OnesFill::D16(v) => sys::cuMemsetD16Async(self.ptr, v, self.len, s),
                OnesFill::D32(v) => sys::cuMemsetD32Async(self.ptr, v, self.len, s),
                OnesFill::Host => return self.copy_from(&vec![T::one(); self.len]),
            }
        };
        r.result().map_err(|e| driver("cuMemsetAsync", e))
    }

    /// Copies `data` (of the tensor's length) from the host.
    pub fn copy_from(&mut self, data: &[T]) -> Result<(), AllocError> {
        if data.len() != self.len {
            return Err(AllocError::InvalidArgument(format!(
                "{} values for a tensor of {}",
                data.len(),
                self.len
            )));
        }
        if self.len == 0 {
            return Ok(());
        }
        let stream = self.stream.clone();
        stream.memcpy_htod(data, self).map_err(|e| driver("cuMemcpyHtoDAsync", e))?;
        stream.synchronize().map_err(|e| driver("cuStreamSynchronize", e))
    }

    /// Copies the tensor to the host.
    pub fn to_vec(&self) -> Result<Vec<T>, AllocError> {
        if self.len == 0 {
            return Ok(Vec::new());
        }
        let v = self.stream.clone_dtoh(self).map_err(|e| driver("cuMemcpyDtoHAsync", e))?;
        self.stream.synchronize().map_err(|e| driver("cuStreamSynchronize", e))?;
        Ok(v)
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The number of elements.
    pub fn numel(&self) -> usize {
        self.len
    }

    /// The size in bytes.
    pub fn nbytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// The device address (0 for an empty tensor).
    pub fn as_ptr(&self) -> u64 {
        self.ptr
    }

    /// The stream it was allocated on.
    pub fn cuda_stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Marks the tensor as used on `stream` too: when it is dropped, its block waits for the
    /// work queued on `stream` so far (PyTorch's `Tensor.record_stream`). The stream is
    /// registered with the allocator's device, which holds it, so unlike in PyTorch it may be
    /// dropped before the tensor (Note \[Uses on other streams\] in `tensor.rs`). A stream of
    /// another GPU is an error.
    pub fn record_stream(&self, stream: &Arc<CudaStream>) -> Result<(), AllocError> {
        if self.ptr == 0 || self.is_own(stream) {
            return Ok(());
        }
        let id = self.alloc.with_device(|d| d.stream_id(stream))?;
        self.alloc.record_stream(self.ptr, id)
    }

    /// The tensor as an argument of a kernel launched on `stream`, recording that use where
    /// `stream` is not its own ([`Tensor::record_stream`]), so that dropping the tensor while
    /// the kernel runs does not hand its block out too early. For kernels that only read it;
    /// [`Tensor::on_mut`] for those that write it. Name the stream the launch runs on: the
    /// argument does not know which launch takes it (cudarc's launch builder does not say),
    /// so pushing it into a launch on another stream records the wrong one.
    ///
    /// ```no_run
    /// # fn f(x: &gpumem::Tensor<f32>, func: &cudarc::driver::CudaFunction,
    /// #      stream: &std::sync::Arc<cudarc::driver::CudaStream>) -> Result<(), Box<dyn std::error::Error>> {
    /// use cudarc::driver::{LaunchConfig, PushKernelArg};
    /// let n = x.numel() as u32;
    /// let mut launch = stream.launch_builder(func);
    /// launch.arg(x.on(stream)?).arg(&n);
    /// // SAFETY: the kernel takes (const float*, unsigned) and stays inside n elements.
    /// unsafe { launch.launch(LaunchConfig::for_num_elems(n)) }?;
    /// # Ok(()) }
    /// ```
    pub fn on(&self, stream: &Arc<CudaStream>) -> Result<KernelArg<'_, T>, AllocError> {
        self.record_stream(stream)?;
        Ok(KernelArg { ptr: &self.ptr, _t: PhantomData })
    }

    /// [`Tensor::on`] for a kernel that writes the tensor: it borrows the tensor mutably for
    /// as long as the argument lives.
    pub fn on_mut(&mut self, stream: &Arc<CudaStream>) -> Result<KernelArg<'_, T>, AllocError> {
        self.record_stream(stream)?;
        Ok(KernelArg { ptr: &self.ptr, _t: PhantomData })
    }

    /// Whether `stream` is the tensor's own stream, whose later work is ordered after
    /// everything it does with the tensor.
    fn is_own(&self, stream: &CudaStream) -> bool {
        stream.cu_stream() == self.stream.cu_stream()
            && stream.context().cu_ctx() == self.stream.context().cu_ctx()
    }

    /// Records a use through cudarc's device-pointer traits (Note \[Uses on other streams\]):
    /// on a registered stream as [`Tensor::record_stream`] does, and on any other stream by
    /// waiting for the stream once cudarc has queued the work.
    fn note_use<'a>(&self, stream: &'a CudaStream) -> SyncOnDrop<'a> {
        if self.ptr == 0 || self.is_own(stream) {
            return SyncOnDrop::Record(None);
        }
        let recorded = match self.alloc.with_device(|d| d.registered_stream_id(stream)) {
            Some(id) => self.alloc.record_stream(self.ptr, id).is_ok(),
            None => false,
        };
        if recorded {
            SyncOnDrop::Record(None)
        } else {
            SyncOnDrop::sync_stream(stream)
        }
    }
}

impl<T: FloatElement> Tensor<T> {
    /// A tensor of normal random numbers (mean 0, std 1) on GPU 0, drawn by cuRAND
    /// (`torch.randn(shape, device='cuda')`).
    pub fn randn(shape: &[usize]) -> Result<Tensor<T>, AllocError> {
        let mut t = Tensor::empty(shape)?;
        t.fill_randn(0x5eed)?;
        Ok(t)
    }

    /// Fills the tensor with normal random numbers from cuRAND, seeded with `seed`.
    pub fn fill_randn(&mut self, seed: u64) -> Result<(), AllocError> {
        if self.len == 0 {
            return Ok(());
        }
        // cuRAND's normal generator needs an even count and makes only f32/f64: an f32
        // tensor of even length is filled in place; anything else draws f32 into a scratch
        // block (rounded up to even) and converts on the host.
        let rng = cudarc::curand::CudaRng::new(seed, self.stream.clone())
            .map_err(|e| driver("curandCreateGenerator", e))?;
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() && self.len.is_multiple_of(2) {
            // SAFETY: T is f32 (checked above), so Tensor<T> and Tensor<f32> are the same type.
            let me = unsafe { &mut *(self as *mut Tensor<T> as *mut Tensor<f32>) };
            return rng.fill_with_normal(me, 0.0f32, 1.0f32).map_err(|e| driver("curandGenerateNormal", e));
        }
        let mut scratch = Tensor::<f32>::empty_with(&self.alloc, &self.stream, &[self.len.div_ceil(2) * 2])?;
        rng.fill_with_normal(&mut scratch, 0.0f32, 1.0f32).map_err(|e| driver("curandGenerateNormal", e))?;
        let host: Vec<T> = scratch.to_vec()?.into_iter().take(self.len).map(T::from_f32).collect();
        self.copy_from(&host)
    }
}

impl<T: Element> Drop for Tensor<T> {
    fn drop(&mut self) {
        // The block returns to the cache of its stream; freeing our own pointer cannot fail.
        let _ = self.alloc.free(self.ptr);
    }
}

impl<T: Element> std::fmt::Debug for Tensor<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor<{}>(shape {:?}, ptr {:#x})", T::DTYPE, self.shape, self.ptr)
    }
}

impl<T: Element> DeviceSlice<T> for Tensor<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T: Element> DevicePtr<T> for Tensor<T> {
    fn device_ptr<'a>(&'a self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        (self.ptr, self.note_use(stream))
    }
}

impl<T: Element> DevicePtrMut<T> for Tensor<T> {
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        (self.ptr, self.note_use(stream))
    }
}

/// A tensor as a kernel argument, from [`Tensor::on`] or [`Tensor::on_mut`]: its use on the
/// launch's stream is recorded already. It pushes the tensor's device address.
pub struct KernelArg<'a, T: Element> {
    ptr: &'a u64,
    _t: PhantomData<&'a T>,
}

impl<T: Element> std::fmt::Debug for KernelArg<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KernelArg<{}>({:#x})", T::DTYPE, self.ptr)
    }
}

// SAFETY: the argument pushed is the address of the tensor's device pointer, which lives as
// long as the borrow of the tensor ('b, which outlives the launch arguments 'a), as cudarc's
// own CudaSlice impls do.
unsafe impl<'a, 'b: 'a, T: Element> PushKernelArg<KernelArg<'b, T>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: KernelArg<'b, T>) -> &mut Self {
        self.arg(arg.ptr)
    }
}
