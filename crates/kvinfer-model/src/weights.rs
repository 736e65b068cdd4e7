//! Typed handles to tensors inside the mapped GGUF file, with their shapes checked at load.

use crate::ggml_type::GgmlType;
use crate::gguf::{GgufFile, TensorInfo};
use std::sync::Arc;

use crate::kernels::{dequantize_row, PackedMat, QMatRef};
use crate::ModelError;

/// A weight matrix of `rows` x `cols` in the file (GGUF dims `[cols, rows]`).
#[derive(Debug, Clone)]
pub struct QMat {
    info: TensorInfo,
    /// Output features.
    pub rows: usize,
    /// Input features (the contiguous dimension).
    pub cols: usize,
    /// The matrix repacked for the group kernels (matmul weights whose type and shape have
    /// them); shared by clones.
    packed: Option<Arc<PackedMat>>,
}

impl QMat {
    /// Looks up `name`, checking it is `rows` x `cols`, and repacks it for the matmul kernels
    /// (a copy in memory: the file's pages of it are then no longer read).
    pub fn load(f: &GgufFile, name: &str, rows: usize, cols: usize) -> Result<Self, ModelError> {
        Ok(Self::load_table(f, name, rows, cols)?.packed(f))
    }

    /// This matrix with a repacked copy for the matmul kernels (when its type and shape have
    /// them): the tied output matrix that is also the embedding table.
    pub fn packed(mut self, f: &GgufFile) -> Self {
        if self.packed.is_none() && self.rows > 1 && crate::kernels::packing_enabled() {
            let info = &self.info;
            self.packed =
                PackedMat::pack_with(self.view(f), |r| f.release_range(info, r)).map(Arc::new);
            if self.packed.is_some() {
                f.mark_copied(info);
            }
        }
        self
    }

    /// Looks up `name`, checking it is `rows` x `cols`, without repacking: a table read a row
    /// at a time (the embedding).
    pub fn load_table(
        f: &GgufFile,
        name: &str,
        rows: usize,
        cols: usize,
    ) -> Result<Self, ModelError> {
        let info = find(f, name)?;
        let want = [cols as u64, rows as u64];
        let dims_ok = info.dims.len() == 2 && info.dims[..] == want
            || info.dims.len() == 1 && rows == 1 && info.dims[0] == cols as u64;
        if !dims_ok {
            return Err(ModelError::Shape(format!(
                "tensor {name} has dims {:?}, expected {want:?}",
                info.dims
            )));
        }
        Ok(Self {
            info: info.clone(),
            rows,
            cols,
            packed: None,
        })
    }

    /// Element type.
    pub fn ty(&self) -> GgmlType {
        self.info.ty
    }

    /// The matrix over the file's bytes.
    pub fn view<'a>(&'a self, f: &'a GgufFile) -> QMatRef<'a> {
        QMatRef {
            ty: self.info.ty,
            rows: self.rows,
            cols: self.cols,
            data: f.tensor_data(&self.info),
            packed: self.packed.as_deref(),
        }
    }

    /// Dequantizes row `r` into `out` (`cols` values): the embedding lookup.
    pub fn row_into(&self, f: &GgufFile, r: usize, out: &mut [f32]) {
        let row_bytes = self.info.size_bytes as usize / self.rows;
        let data = f.tensor_data(&self.info);
        dequantize_row(self.info.ty, &data[r * row_bytes..(r + 1) * row_bytes], out);
    }
}

fn find<'a>(f: &'a GgufFile, name: &str) -> Result<&'a TensorInfo, ModelError> {
    f.tensor(name)
        .ok_or_else(|| ModelError::MissingTensor(name.to_string()))
}

/// A 1-D tensor of `len` values as f32 (norm weights).
pub fn load_vec(f: &GgufFile, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
    let m = QMat::load(f, name, 1, len)?;
    let mut out = vec![0f32; len];
    m.row_into(f, 0, &mut out);
    Ok(out)
}
