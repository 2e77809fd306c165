//! Tensor handles.
//!
//! A `Tensor` is a typed, shaped *view* of memory owned by a backend: an address in that backend's
//! address space (a host pointer for the CPU backend, a `CUdeviceptr` for CUDA), a dtype, a shape
//! and where the memory lives. It is `Copy` and carries no lifetime, like a pointer in llm.c: the
//! backend that allocated it keeps the memory alive until it is dropped, and the orchestration code
//! (the model) is responsible for not aliasing an op's output with its inputs except where the op
//! documents in-place use. Every backend checks shapes and dtypes before touching memory.

use crate::dtype::DType;
use crate::error::{Error, Result};

pub const MAX_DIMS: usize = 4;

/// Where a tensor's bytes live.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mem {
    /// Device memory (for the CPU backend: ordinary host memory).
    Device,
    /// Page-locked host memory, mapped into the device's address space and reachable by copy
    /// engines (for the CPU backend: host memory).
    Host,
    /// Page-locked host memory allocated write-combined: uncached for the host CPU, so the
    /// device reads it over the link faster, and host CPU reads of it are very slow. Only
    /// devices and copy engines read it in a run; a backend's `download` of it goes through the
    /// device (for the CPU backend: host memory, accounted apart).
    HostWriteCombined,
}

impl Mem {
    pub const ALL: [Mem; 3] = [Mem::Device, Mem::Host, Mem::HostWriteCombined];
    /// Pinned host memory of either kind.
    pub fn is_host(self) -> bool {
        self != Mem::Device
    }
    /// The space of index `i` (`mem as u8`), for accounting keyed by it.
    pub fn from_index(i: u8) -> Mem {
        Mem::ALL[i as usize]
    }
    pub fn name(self) -> &'static str {
        match self {
            Mem::Device => "device",
            Mem::Host => "pinned host",
            Mem::HostWriteCombined => "write-combined host",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    dims: [usize; MAX_DIMS],
    ndim: u8,
}

impl Shape {
    pub fn new(dims: &[usize]) -> Shape {
        assert!(dims.len() <= MAX_DIMS && !dims.is_empty(), "shape rank must be 1..=4, got {dims:?}");
        let mut d = [1; MAX_DIMS];
        d[..dims.len()].copy_from_slice(dims);
        Shape { dims: d, ndim: dims.len() as u8 }
    }
    pub fn dims(&self) -> &[usize] {
        &self.dims[..self.ndim as usize]
    }
    pub fn ndim(&self) -> usize {
        self.ndim as usize
    }
    pub fn numel(&self) -> usize {
        self.dims().iter().product()
    }
    /// The last dimension ("columns") and the product of the others ("rows").
    pub fn rows_cols(&self) -> (usize, usize) {
        let d = self.dims();
        let cols = *d.last().unwrap();
        (self.numel() / cols.max(1), cols)
    }
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.dims())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Tensor {
    /// Address of the first element in the owning backend's address space.
    pub addr: u64,
    pub dtype: DType,
    pub shape: Shape,
    pub mem: Mem,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor({} {:?} @{:#x} {:?})", self.dtype, self.shape, self.addr, self.mem)
    }
}

impl Tensor {
    pub fn numel(&self) -> usize {
        self.shape.numel()
    }
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }
    pub fn dims(&self) -> &[usize] {
        self.shape.dims()
    }
    pub fn rows_cols(&self) -> (usize, usize) {
        self.shape.rows_cols()
    }
    /// The same memory seen with another shape of the same element count.
    pub fn reshape(&self, dims: &[usize]) -> Tensor {
        let s = Shape::new(dims);
        assert_eq!(s.numel(), self.numel(), "reshape {:?} -> {:?}", self.shape, dims);
        Tensor { shape: s, ..*self }
    }
    /// A contiguous sub-range of `numel` elements starting at element `offset`, with shape `dims`.
    pub fn slice(&self, offset: usize, dims: &[usize]) -> Tensor {
        let s = Shape::new(dims);
        assert!(
            offset + s.numel() <= self.numel(),
            "slice {}+{} out of range for {:?}",
            offset,
            s.numel(),
            self.shape
        );
        Tensor { addr: self.addr + (offset * self.dtype.size()) as u64, shape: s, ..*self }
    }
    /// The bytes from `byte_offset` on seen as a `dtype` tensor of shape `dims` (for buffers that
    /// hold different tensors at different times).
    pub fn view(&self, byte_offset: usize, dtype: DType, dims: &[usize]) -> Tensor {
        let s = Shape::new(dims);
        assert!(byte_offset + s.numel() * dtype.size() <= self.bytes(), "view of {} bytes at {byte_offset} out of range for {self:?}", s.numel() * dtype.size());
        Tensor { addr: self.addr + byte_offset as u64, dtype, shape: s, mem: self.mem }
    }
    /// Rows `r0..r0+n` of a tensor seen as [rows, cols].
    pub fn rows(&self, r0: usize, n: usize) -> Tensor {
        let (_, c) = self.rows_cols();
        self.slice(r0 * c, &[n, c])
    }
    /// Checks dtype and shape, with a message naming the op and argument.
    pub fn expect(&self, op: &str, arg: &str, dtype: Option<DType>, dims: &[usize]) -> Result<()> {
        if let Some(dt) = dtype {
            if self.dtype != dt {
                return Err(Error::Op(format!("{op}: {arg} must be {dt}, got {}", self.dtype)));
            }
        }
        if self.numel() != dims.iter().product::<usize>() {
            return Err(Error::Op(format!("{op}: {arg} must have shape {dims:?}, got {:?}", self.shape)));
        }
        Ok(())
    }
    pub fn expect_numel(&self, op: &str, arg: &str, n: usize) -> Result<()> {
        if self.numel() != n {
            return Err(Error::Op(format!("{op}: {arg} must have {n} elements, got {:?}", self.shape)));
        }
        Ok(())
    }
    pub fn expect_dtype(&self, op: &str, arg: &str, allowed: &[DType]) -> Result<()> {
        if !allowed.contains(&self.dtype) {
            return Err(Error::Op(format!("{op}: {arg} must be one of {allowed:?}, got {}", self.dtype)));
        }
        Ok(())
    }
}
