//! A small typed tensor over the allocator, so that Rust code reads like the PyTorch code it
//! mirrors. It is not a tensor library: it allocates, fills, copies to and from the host, and
//! frees its block when dropped.
//!
//! It implements cudarc's device-pointer traits, so a gpumem tensor can be passed to cudarc
//! copies (`memcpy_htod`, `memcpy_dtoh`), cuRAND, and kernel launches: gpumem then serves as the
//! allocator of a cudarc program. Using a tensor on a stream other than its own records that
//! use (`record_stream`), so its block is not reused before that stream is done with it; that
//! stream must then outlive the tensor.

use crate::device::DeviceError;
use crate::device::StreamId;
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
        let ptr = alloc.malloc(bytes as u64, StreamId(stream.cu_stream() as u64))?;
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
    /// work queued on `stream` so far (PyTorch's `Tensor.record_stream`). As in PyTorch, the
    /// stream must outlive the tensor: the wait is an event recorded on it at the drop.
    pub fn record_stream(&self, stream: &CudaStream) -> Result<(), AllocError> {
        if self.ptr == 0 {
            return Ok(());
        }
        self.alloc.record_stream(self.ptr, StreamId(stream.cu_stream() as u64))
    }

    fn note_use(&self, stream: &CudaStream) {
        if stream.cu_stream() != self.stream.cu_stream() && self.ptr != 0 {
            // The pointer is ours and live, so this cannot fail.
            let _ = self.record_stream(stream);
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
        self.note_use(stream);
        (self.ptr, SyncOnDrop::Record(None))
    }
}

impl<T: Element> DevicePtrMut<T> for Tensor<T> {
    fn device_ptr_mut<'a>(&'a mut self, stream: &'a CudaStream) -> (u64, SyncOnDrop<'a>) {
        self.note_use(stream);
        (self.ptr, SyncOnDrop::Record(None))
    }
}

// SAFETY: the argument pushed is the address of the tensor's device pointer, which lives as
// long as the borrow of the tensor, as cudarc's own CudaSlice impls do.
unsafe impl<'a, 'b: 'a, T: Element> PushKernelArg<&'b Tensor<T>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b Tensor<T>) -> &mut Self {
        self.arg(&arg.ptr)
    }
}

// SAFETY: as above.
unsafe impl<'a, 'b: 'a, T: Element> PushKernelArg<&'b mut Tensor<T>> for LaunchArgs<'a> {
    #[inline(always)]
    fn arg(&mut self, arg: &'b mut Tensor<T>) -> &mut Self {
        self.arg(&arg.ptr)
    }
}
