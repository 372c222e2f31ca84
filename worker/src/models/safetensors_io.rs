//! Memory-mapped safetensors reading and streaming safetensors writing, for model files
//! too large to hold twice in memory.
//!
//! - [`MappedFile`] maps a file once and reads one tensor at a time, cast on read. After a
//!   tensor is copied out, its pages are dropped from the process (`MADV_DONTNEED`; they stay
//!   in the page cache), so loading a model costs about the model's size in the compute dtype,
//!   not that plus the file: candle's own mmap backend keeps every page it touched resident
//!   until the builder is dropped.
//! - [`write_streaming`] writes a safetensors file tensor by tensor from a callback, so a
//!   merged or converted checkpoint never needs all its tensors in memory at once.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{bail, DType, Device, Result, Tensor};

/// What a tensor of a mapped file is: dtype, shape and where its bytes are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    /// Byte range in the file (absolute).
    pub start: usize,
    pub end: usize,
}

/// A memory-mapped safetensors file.
pub struct MappedFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    tensors: HashMap<String, TensorEntry>,
    /// Tensor names in file (offset) order.
    order: Vec<String>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for MappedFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

/// candle's dtype for a safetensors dtype, where candle has one.
pub fn candle_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F64 => DType::F64,
        S::F32 => DType::F32,
        S::F16 => DType::F16,
        S::BF16 => DType::BF16,
        S::I64 => DType::I64,
        S::U32 => DType::U32,
        S::U8 => DType::U8,
        _ => return None,
    })
}

/// The safetensors dtype of a candle dtype.
pub fn st_dtype(d: DType) -> Result<safetensors::Dtype> {
    use safetensors::Dtype as S;
    Ok(match d {
        DType::F64 => S::F64,
        DType::F32 => S::F32,
        DType::F16 => S::F16,
        DType::BF16 => S::BF16,
        DType::I64 => S::I64,
        DType::U32 => S::U32,
        DType::U8 => S::U8,
        other => bail!("cannot store dtype {other:?} in safetensors"),
    })
}

impl MappedFile {
    /// Maps `path` and parses its header. A file too short for what its header promises
    /// (a truncated download) is an error that says so.
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path)
            .map_err(|e| candle_core::Error::Msg(format!("cannot open {}: {e}", path.display())))?;
        // SAFETY: mapped read-only; Loft never writes a model file while it is mapped (merge
        // output goes to another path, and refuses the input's own path).
        let mmap = unsafe { memmap2::Mmap::map(&file) }
            .map_err(|e| candle_core::Error::Msg(format!("cannot map {}: {e}", path.display())))?;
        let bad = |what: String| candle_core::Error::Msg(format!("{} is not a valid safetensors file: {what}", path.display()));
        let (n, header) = safetensors::SafeTensors::read_metadata(&mmap).map_err(|e| match e {
            safetensors::SafeTensorError::MetadataIncompleteBuffer => {
                bad(format!("the file ({} bytes) is shorter than its header says (truncated?)", mmap.len()))
            }
            e => bad(format!("{e:?}")),
        })?;
        let data_start = 8 + n;
        let mut tensors = HashMap::new();
        let mut order: Vec<(usize, String)> = Vec::new();
        let mut data_end = 0;
        for (name, info) in header.tensors() {
            let (a, b) = info.data_offsets;
            data_end = data_end.max(b);
            tensors.insert(
                name.clone(),
                TensorEntry { dtype: info.dtype, shape: info.shape.clone(), start: data_start + a, end: data_start + b },
            );
            order.push((a, name));
        }
        if data_start + data_end > mmap.len() {
            return Err(bad(format!(
                "the header describes {} bytes of tensor data but the file holds {} (truncated?)",
                data_end,
                mmap.len().saturating_sub(data_start)
            )));
        }
        order.sort();
        let metadata = header.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok(Self { path: path.to_path_buf(), mmap, tensors, order: order.into_iter().map(|(_, n)| n).collect(), metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensor names in file order.
    pub fn names(&self) -> &[String] {
        &self.order
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn entry(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.get(name)
    }

    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|e| e.shape.as_slice())
    }

    /// The header's `__metadata__`.
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The stored bytes of a tensor (borrowed from the map).
    pub fn bytes(&self, name: &str) -> Option<&[u8]> {
        self.tensors.get(name).map(|e| &self.mmap[e.start..e.end])
    }

    /// Reads a tensor onto the CPU, cast to `dtype` (`None` keeps the stored dtype), then
    /// releases the pages it came from.
    pub fn read(&self, name: &str, dtype: Option<DType>) -> Result<Tensor> {
        let Some(e) = self.tensors.get(name) else {
            bail!("{}: no tensor {name}", self.path.display())
        };
        let Some(stored) = candle_dtype(e.dtype) else {
            bail!("{}: tensor {name} has dtype {:?}, which Loft cannot read", self.path.display(), e.dtype)
        };
        let t = Tensor::from_raw_buffer(&self.mmap[e.start..e.end], stored, &e.shape, &Device::Cpu)?;
        self.release(e.start, e.end);
        match dtype {
            Some(d) if d != stored => t.to_dtype(d),
            _ => Ok(t),
        }
    }

    /// Drops the whole pages inside `[start, end)` from this process's resident set. Only a
    /// hint: failures are ignored, and a later read faults the pages back in from the file.
    fn release(&self, start: usize, end: usize) {
        const PAGE: usize = 4096;
        let a = start.div_ceil(PAGE) * PAGE;
        let b = end / PAGE * PAGE;
        if b > a {
            // SAFETY: the map is read-only and file-backed, so MADV_DONTNEED discards nothing
            // that cannot be read again; no reference into these pages outlives this call's
            // caller copying them out (`from_raw_buffer` above copied).
            let _ = unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, a, b - a) };
        }
    }
}

/// One tensor of a file being written: its name, dtype, shape (the byte length follows).
#[derive(Clone, Debug)]
pub struct OutEntry {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
}

impl OutEntry {
    pub fn byte_len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

/// Writes a safetensors file with `entries` in the given order; `fill(i, out)` must write
/// exactly entry `i`'s bytes. The file is written to a sibling temporary and renamed into
/// place, so a failed write leaves nothing half-written at `path`.
pub fn write_streaming(
    path: &Path,
    entries: &[OutEntry],
    metadata: &BTreeMap<String, String>,
    mut fill: impl FnMut(usize, &mut dyn Write) -> Result<()>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(metadata).map_err(candle_core::Error::wrap)?);
    }
    let mut offset = 0usize;
    for e in entries {
        let n = e.byte_len();
        let dtype = serde_json::to_value(e.dtype).map_err(candle_core::Error::wrap)?;
        header.insert(
            e.name.clone(),
            serde_json::json!({ "dtype": dtype, "shape": e.shape, "data_offsets": [offset, offset + n] }),
        );
        offset += n;
    }
    let mut hbytes = serde_json::to_vec(&serde_json::Value::Object(header)).map_err(candle_core::Error::wrap)?;
    hbytes.resize(hbytes.len().next_multiple_of(8), b' ');

    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let f = std::fs::File::create(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, f);
        w.write_all(&(hbytes.len() as u64).to_le_bytes())?;
        w.write_all(&hbytes)?;
        for (i, e) in entries.iter().enumerate() {
            let mut counter = CountingWriter { inner: &mut w, n: 0 };
            fill(i, &mut counter)?;
            if counter.n != e.byte_len() {
                bail!("writing {}: tensor {} got {} bytes, expected {}", path.display(), e.name, counter.n, e.byte_len());
            }
        }
        w.flush()?;
        w.get_ref().sync_all()?;
        Ok(())
    })();
    match result {
        Ok(()) => std::fs::rename(&tmp, path)
            .map_err(|e| candle_core::Error::Msg(format!("cannot move the written file to {}: {e}", path.display()))),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

struct CountingWriter<'a> {
    inner: &'a mut dyn Write,
    n: usize,
}

impl Write for CountingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k;
        Ok(k)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// A tensor's bytes as stored in a safetensors file (little-endian, contiguous), in the
/// tensor's own dtype.
pub fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    use safetensors::View;
    let t = t.to_device(&Device::Cpu)?.contiguous()?;
    Ok(t.data().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streaming_write_reads_back_and_truncation_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[0.5f32, -1.0, 7.0], &Device::Cpu).unwrap().to_dtype(DType::F16).unwrap();
        let entries = vec![
            OutEntry { name: "z.a".into(), dtype: safetensors::Dtype::F32, shape: vec![2, 2] },
            OutEntry { name: "b".into(), dtype: safetensors::Dtype::F16, shape: vec![3] },
        ];
        let meta = BTreeMap::from([("k".to_string(), "v".to_string())]);
        write_streaming(&path, &entries, &meta, |i, w| {
            w.write_all(&tensor_bytes(if i == 0 { &a } else { &b })?)?;
            Ok(())
        })
        .unwrap();
        let f = MappedFile::open(&path).unwrap();
        assert_eq!(f.names(), &["z.a".to_string(), "b".to_string()]);
        assert_eq!(f.metadata().get("k").map(|s| s.as_str()), Some("v"));
        let got = f.read("z.a", None).unwrap();
        assert_eq!(got.to_vec2::<f32>().unwrap(), vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
        let got = f.read("b", Some(DType::F32)).unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), vec![0.5, -1.0, 7.0]);
        drop(f);

        // Cut the last bytes off: the header promises more than the file holds.
        let bytes = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut.safetensors");
        std::fs::write(&cut, &bytes[..bytes.len() - 3]).unwrap();
        let err = MappedFile::open(&cut).unwrap_err().to_string();
        assert!(err.contains("truncated"), "{err}");

        // A wrong byte count from the callback is an error and leaves no file behind.
        let bad = dir.path().join("bad.safetensors");
        let err = write_streaming(&bad, &entries, &meta, |_, w| {
            w.write_all(&[0u8; 3])?;
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("expected"), "{err}");
        assert!(!bad.exists());
    }
}
