//! GGUF v3 reader over a memory map (spec: ggml/docs/gguf.md).
//!
//! ```text
//! file := header kv* tensor_info* padding data
//! header := "GGUF" u32:version u64:tensor_count u64:kv_count
//! kv := string:key u32:value_type value
//! tensor_info := string:name u32:n_dims u64[n_dims]:dims u32:ggml_type u64:offset (relative to data)
//! data starts at the next multiple of `general.alignment` (default 32)
//! ```
//! Every read is bounds-checked: a truncated or malformed file gives a [`GgufError`] that says what
//! and where, never a panic. Tensor data stays in the map; [`GgufFile::tensor_data`] borrows it.

mod write;

pub use write::GgufWriter;

use crate::ggml_type::GgmlType;
use memmap2::Mmap;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// "GGUF" read as a little-endian u32.
const GGUF_MAGIC: u32 = 0x4655_4747;
/// Alignment of the data section when the file does not say (`general.alignment`).
const DEFAULT_ALIGNMENT: u64 = 32;
/// Sanity caps so a corrupt count cannot make us allocate the moon.
const MAX_ITEMS: u64 = 1 << 28;
const MAX_DIMS: u32 = 4;

/// What can go wrong reading a GGUF file.
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file could not be opened or mapped.
    #[error("cannot read GGUF file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The first four bytes are not "GGUF".
    #[error("not a GGUF file (bad magic {0:#010x}); expected a .gguf model")]
    BadMagic(u32),
    /// Only version 2 and 3 are read.
    #[error("unsupported GGUF version {0} (kvinfer reads versions 2 and 3)")]
    UnsupportedVersion(u32),
    /// The file ends before a structure it announced.
    #[error(
        "GGUF file is truncated: {what} at byte {offset} needs {needed} bytes, file has {len}"
    )]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Where.
        offset: u64,
        /// How many bytes it needed.
        needed: u64,
        /// Length of the file.
        len: u64,
    },
    /// A structurally invalid value (unknown type id, absurd count, bad UTF-8...).
    #[error("malformed GGUF file: {0}")]
    Malformed(String),
    /// A tensor uses a type kvinfer does not implement.
    #[error(
        "tensor {name} has type {} (ggml type id {type_id}), which kvinfer does not support \
         (it runs {})",
        GgmlType::id_name(*type_id).unwrap_or("unknown"),
        GgmlType::weight_type_names()
    )]
    UnsupportedTensorType {
        /// The tensor.
        name: String,
        /// The raw type id.
        type_id: u32,
    },
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(String),
    Array(Vec<MetaValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetaValue {
    /// Any integer type as u64 (negative values are `None`).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type as i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any numeric type as f32.
    pub fn as_f32(&self) -> Option<f32> {
        match *self {
            Self::F32(v) => Some(v),
            Self::F64(v) => Some(v as f32),
            _ => self.as_i64().map(|v| v as f32),
        }
    }
}

/// Where one tensor lives in the file.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// GGUF dims: `dims[0]` is the contiguous one (columns of a weight matrix).
    pub dims: Vec<u64>,
    /// Element type.
    pub ty: GgmlType,
    /// Absolute byte offset of the data in the file.
    pub offset: u64,
    /// Byte length of the data.
    pub size_bytes: u64,
}

impl TensorInfo {
    /// Number of elements.
    pub fn num_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// An open GGUF file: parsed metadata and tensor index over a read-only memory map.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// GGUF format version.
    pub version: u32,
    metadata: HashMap<String, MetaValue>,
    /// Keys in file order.
    keys: Vec<String>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    /// Which tensors were looked up by name: a model that leaves one unread is refused
    /// (an unknown tensor is never ignored).
    looked_up: Vec<AtomicBool>,
    /// Tensors whose bytes were copied (repacked) at load: their pages may be dropped again
    /// after a later read (the fingerprint's samples).
    copied: Vec<AtomicBool>,
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], GgufError> {
        let len = self.buf.len() as u64;
        let end = (self.pos as u64).checked_add(n).filter(|&e| e <= len);
        match end {
            Some(end) => {
                let s = &self.buf[self.pos..end as usize];
                self.pos = end as usize;
                Ok(s)
            }
            None => Err(GgufError::Truncated {
                what,
                offset: self.pos as u64,
                needed: n,
                len,
            }),
        }
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    fn string(&mut self, what: &'static str) -> Result<String, GgufError> {
        let n = self.u64(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| GgufError::Malformed(format!("{what} at byte {} is not UTF-8", self.pos)))
    }
    fn count(&mut self, what: &'static str) -> Result<u64, GgufError> {
        let n = self.u64(what)?;
        if n > MAX_ITEMS {
            return Err(GgufError::Malformed(format!("{what} count {n} is absurd")));
        }
        Ok(n)
    }

    fn value(&mut self, type_id: u32, depth: u32) -> Result<MetaValue, GgufError> {
        const W: &str = "metadata value";
        Ok(match type_id {
            0 => MetaValue::U8(self.array::<1>(W)?[0]),
            1 => MetaValue::I8(self.array::<1>(W)?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array(W)?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array(W)?)),
            4 => MetaValue::U32(self.u32(W)?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array(W)?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array(W)?)),
            7 => MetaValue::Bool(self.array::<1>(W)?[0] != 0),
            8 => MetaValue::Str(self.string("metadata string")?),
            9 => {
                if depth > 2 {
                    return Err(GgufError::Malformed(
                        "metadata arrays nested too deep".into(),
                    ));
                }
                let item_type = self.u32("array item type")?;
                let n = self.count("array")?;
                // Each item takes at least one byte: a count past the end is a truncation.
                let remaining = (self.buf.len() - self.pos) as u64;
                if n > remaining {
                    return Err(GgufError::Truncated {
                        what: "metadata array",
                        offset: self.pos as u64,
                        needed: n,
                        len: self.buf.len() as u64,
                    });
                }
                let mut items = Vec::with_capacity(n as usize);
                for _ in 0..n {
                    items.push(self.value(item_type, depth + 1)?);
                }
                MetaValue::Array(items)
            }
            10 => MetaValue::U64(self.u64(W)?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array(W)?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array(W)?)),
            t => {
                return Err(GgufError::Malformed(format!(
                    "unknown metadata value type {t}"
                )))
            }
        })
    }
}

impl GgufFile {
    /// Opens and parses `path`. The tensor data is not read, only mapped.
    pub fn open(path: &Path) -> Result<Self, GgufError> {
        let io = |source| GgufError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; model files are not modified while served (documented).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        Self::parse(path.to_path_buf(), mmap)
    }

    fn parse(path: PathBuf, mmap: Mmap) -> Result<Self, GgufError> {
        let buf: &[u8] = &mmap;
        let mut c = Cursor { buf, pos: 0 };
        let magic = c.u32("magic")?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic(magic));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion(version));
        }
        let n_tensors = c.count("tensor")?;
        let n_kv = c.count("metadata key/value")?;
        let mut metadata = HashMap::new();
        let mut keys = Vec::new();
        for _ in 0..n_kv {
            let key = c.string("metadata key")?;
            let ty = c.u32("metadata value type")?;
            let value = c.value(ty, 0)?;
            keys.push(key.clone());
            metadata.insert(key, value);
        }
        let mut raw = Vec::with_capacity(n_tensors.min(1 << 16) as usize);
        for _ in 0..n_tensors {
            let name = c.string("tensor name")?;
            let n_dims = c.u32("tensor n_dims")?;
            if n_dims == 0 || n_dims > MAX_DIMS {
                return Err(GgufError::Malformed(format!(
                    "tensor {name} has {n_dims} dims"
                )));
            }
            let mut dims = Vec::with_capacity(n_dims as usize);
            for _ in 0..n_dims {
                dims.push(c.u64("tensor dim")?);
            }
            let type_id = c.u32("tensor type")?;
            let offset = c.u64("tensor offset")?;
            raw.push((name, dims, type_id, offset));
        }
        let alignment = match metadata
            .get("general.alignment")
            .and_then(MetaValue::as_u64)
        {
            Some(a) if a.is_power_of_two() => a,
            Some(a) => return Err(GgufError::Malformed(format!("general.alignment {a}"))),
            None => DEFAULT_ALIGNMENT,
        };
        let data_start = (c.pos as u64).div_ceil(alignment) * alignment;
        let file_len = buf.len() as u64;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut by_name = HashMap::new();
        for (name, dims, type_id, rel) in raw {
            let ty =
                GgmlType::from_id(type_id).ok_or_else(|| GgufError::UnsupportedTensorType {
                    name: name.clone(),
                    type_id,
                })?;
            let n: u64 = dims
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| {
                    GgufError::Malformed(format!("tensor {name} dims {dims:?} overflow"))
                })?;
            if dims[0] % ty.block_size() as u64 != 0 {
                return Err(GgufError::Malformed(format!(
                    "tensor {name}: row of {} is not a whole number of {ty:?} blocks",
                    dims[0]
                )));
            }
            let size_bytes = n / ty.block_size() as u64 * ty.type_size() as u64;
            let offset = data_start.checked_add(rel).ok_or_else(|| {
                GgufError::Malformed(format!("tensor {name} offset {rel} overflows"))
            })?;
            if offset % alignment != 0 {
                return Err(GgufError::Malformed(format!(
                    "tensor {name} offset {rel} unaligned"
                )));
            }
            if offset
                .checked_add(size_bytes)
                .is_none_or(|end| end > file_len)
            {
                return Err(GgufError::Truncated {
                    what: "tensor data",
                    offset,
                    needed: size_bytes,
                    len: file_len,
                });
            }
            if by_name.insert(name.clone(), tensors.len()).is_some() {
                return Err(GgufError::Malformed(format!("duplicate tensor {name}")));
            }
            tensors.push(TensorInfo {
                name,
                dims,
                ty,
                offset,
                size_bytes,
            });
        }
        Ok(Self {
            path,
            mmap,
            version,
            metadata,
            keys,
            looked_up: tensors.iter().map(|_| AtomicBool::new(false)).collect(),
            copied: tensors.iter().map(|_| AtomicBool::new(false)).collect(),
            tensors,
            by_name,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The names of the tensors never looked up with [`Self::tensor`], in file order.
    pub fn unread_tensors(&self) -> Vec<&str> {
        (self.tensors.iter().zip(&self.looked_up))
            .filter(|(_, u)| !u.load(Ordering::Relaxed))
            .map(|(t, _)| t.name.as_str())
            .collect()
    }

    /// Metadata keys in file order.
    pub fn keys(&self) -> &[String] {
        &self.keys
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.get(key)
    }

    /// A string value.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.meta(key)? {
            MetaValue::Str(s) => Some(s),
            _ => None,
        }
    }

    /// Any non-negative integer value that fits u32.
    pub fn get_u32(&self, key: &str) -> Option<u32> {
        self.meta(key)?.as_u64().and_then(|v| u32::try_from(v).ok())
    }

    /// Any numeric value as f32.
    pub fn get_f32(&self, key: &str) -> Option<f32> {
        self.meta(key)?.as_f32()
    }

    /// A bool value.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        match self.meta(key)? {
            MetaValue::Bool(b) => Some(*b),
            _ => None,
        }
    }

    fn get_array(&self, key: &str) -> Option<&[MetaValue]> {
        match self.meta(key)? {
            MetaValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// An array of numbers as f32 (`None` if absent or not numeric).
    pub fn get_f32_array(&self, key: &str) -> Option<Vec<f32>> {
        self.get_array(key)?.iter().map(MetaValue::as_f32).collect()
    }

    /// An array of integers as i32.
    pub fn get_i32_array(&self, key: &str) -> Option<Vec<i32>> {
        self.get_array(key)?
            .iter()
            .map(|v| v.as_i64().and_then(|x| i32::try_from(x).ok()))
            .collect()
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Option<Vec<String>> {
        self.get_array(key)?
            .iter()
            .map(|v| match v {
                MetaValue::Str(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    /// All tensors in file order.
    pub fn tensors(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// A tensor's index entry.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        let i = *self.by_name.get(name)?;
        self.looked_up[i].store(true, Ordering::Relaxed);
        Some(&self.tensors[i])
    }

    /// A tensor's bytes (bounds were checked at open).
    pub fn tensor_data(&self, info: &TensorInfo) -> &[u8] {
        &self.mmap[info.offset as usize..(info.offset + info.size_bytes) as usize]
    }

    /// Drops this process's resident pages of a tensor that was copied (repacked) and is no
    /// longer read in bulk, so they stop counting in its memory; a later read faults them back
    /// in from the file. A hint: errors are ignored.
    pub fn release(&self, info: &TensorInfo) {
        self.release_range(info, 0..info.size_bytes as usize);
    }

    /// Marks a tensor as copied into memory of its own (repacked): [`Self::release_copied`]
    /// then drops its pages.
    pub fn mark_copied(&self, info: &TensorInfo) {
        if let Some(&i) = self.by_name.get(&info.name) {
            self.copied[i].store(true, Ordering::Relaxed);
        }
    }

    /// [`Self::release`] if the tensor was marked copied (its pages are otherwise read again:
    /// dropping them would only make the next read fault them back in).
    pub fn release_copied(&self, info: &TensorInfo) {
        if let Some(&i) = self.by_name.get(&info.name) {
            if self.copied[i].load(Ordering::Relaxed) {
                self.release(info);
            }
        }
    }

    /// [`Self::release`] for bytes `range` of the tensor's data.
    pub fn release_range(&self, info: &TensorInfo, range: std::ops::Range<usize>) {
        const PAGE: usize = 4096;
        let end = range.end.min(info.size_bytes as usize);
        let start = (info.offset as usize + range.start).next_multiple_of(PAGE);
        let end = (info.offset as usize + end) / PAGE * PAGE;
        if end > start {
            // SAFETY: the map is read-only and shared with its file: dropping pages loses
            // nothing, the next read gets the file's bytes again.
            let _ = unsafe {
                self.mmap.unchecked_advise_range(
                    memmap2::UncheckedAdvice::DontNeed,
                    start,
                    end - start,
                )
            };
        }
    }

    /// Total bytes of the mapped file.
    pub fn file_len(&self) -> u64 {
        self.mmap.len() as u64
    }
}

#[cfg(test)]
mod tests;
