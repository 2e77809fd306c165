//! A hardened reader and an atomic writer for the safetensors format.
//!
//! Format: `u64` little-endian header length N, then N bytes of UTF-8 JSON (an object mapping
//! tensor names to `{"dtype", "shape", "data_offsets": [begin, end]}` plus an optional
//! `"__metadata__"` string map), then the data section. Offsets are relative to the start of the
//! data section.
//!
//! The reader treats the file as hostile: the header length is checked against the file size and
//! a 100 MB cap before anything is allocated, every tensor entry is validated (known dtype,
//! shape, offsets inside the data section, `end - begin == numel * dtype size` with checked
//! arithmetic, no two tensors overlapping, no duplicate names), and tensor data is read on demand
//! with a seek and a read of exactly the validated size. Every failure is an
//! [`Error::File`] naming the file and the problem; nothing panics on bad input.
//!
//! The writer sorts tensors by name, pads the header with spaces to a multiple of 8 bytes, writes
//! to a temporary name next to the destination, fsyncs and renames, so a crash never leaves a
//! half-written file under the final name.

use llmq_core::dtype::{bf16_to_f32, e4m3_to_f32, e5m2_to_f32, f32_to_bf16};
use llmq_core::{Error, Result};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Largest header the reader accepts.
pub const MAX_HEADER_BYTES: u64 = 100 * 1000 * 1000;

/// Element types of the safetensors format that this crate understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StDtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
    F8E4M3,
    F8E5M2,
}

impl StDtype {
    pub fn size(self) -> usize {
        match self {
            StDtype::F64 | StDtype::I64 => 8,
            StDtype::F32 | StDtype::I32 => 4,
            StDtype::F16 | StDtype::BF16 | StDtype::I16 => 2,
            StDtype::I8 | StDtype::U8 | StDtype::Bool | StDtype::F8E4M3 | StDtype::F8E5M2 => 1,
        }
    }
    /// The spelling used in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            StDtype::F64 => "F64",
            StDtype::F32 => "F32",
            StDtype::F16 => "F16",
            StDtype::BF16 => "BF16",
            StDtype::I64 => "I64",
            StDtype::I32 => "I32",
            StDtype::I16 => "I16",
            StDtype::I8 => "I8",
            StDtype::U8 => "U8",
            StDtype::Bool => "BOOL",
            StDtype::F8E4M3 => "F8_E4M3",
            StDtype::F8E5M2 => "F8_E5M2",
        }
    }
    pub fn parse(s: &str) -> Option<StDtype> {
        Some(match s {
            "F64" => StDtype::F64,
            "F32" => StDtype::F32,
            "F16" => StDtype::F16,
            "BF16" => StDtype::BF16,
            "I64" => StDtype::I64,
            "I32" => StDtype::I32,
            "I16" => StDtype::I16,
            "I8" => StDtype::I8,
            "U8" => StDtype::U8,
            "BOOL" => StDtype::Bool,
            "F8_E4M3" => StDtype::F8E4M3,
            "F8_E5M2" => StDtype::F8E5M2,
            _ => return None,
        })
    }
    /// Whether [`decode_to_f32`] can convert this type (floating point and I32).
    pub fn converts_to_f32(self) -> bool {
        matches!(
            self,
            StDtype::F64 | StDtype::F32 | StDtype::F16 | StDtype::BF16 | StDtype::I32 | StDtype::F8E4M3 | StDtype::F8E5M2
        )
    }
    /// The safetensors type for an llmq dtype.
    pub fn from_dtype(d: llmq_core::DType) -> StDtype {
        use llmq_core::DType;
        match d {
            DType::F32 => StDtype::F32,
            DType::BF16 => StDtype::BF16,
            DType::E4M3 => StDtype::F8E4M3,
            DType::E5M2 => StDtype::F8E5M2,
            DType::I32 => StDtype::I32,
        }
    }
}

impl std::fmt::Display for StDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Decodes little-endian `bytes` of `dtype` into `out` (`out.len()` elements). Errors for
/// types without a meaningful f32 value (integers other than I32, BOOL) and for length mismatch.
pub fn decode_to_f32(dtype: StDtype, bytes: &[u8], out: &mut [f32]) -> std::result::Result<(), String> {
    let need = out.len().checked_mul(dtype.size()).ok_or("element count overflows")?;
    if bytes.len() != need {
        return Err(format!("{} bytes do not hold {} {} values ({need} bytes)", bytes.len(), out.len(), dtype));
    }
    match dtype {
        StDtype::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        StDtype::F64 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(8)) {
                *o = f64::from_le_bytes(c.try_into().unwrap()) as f32;
            }
        }
        StDtype::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = bf16_to_f32(u16::from_le_bytes([c[0], c[1]]));
            }
        }
        StDtype::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32();
            }
        }
        StDtype::I32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32;
            }
        }
        StDtype::F8E4M3 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = e4m3_to_f32(b);
            }
        }
        StDtype::F8E5M2 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = e5m2_to_f32(b);
            }
        }
        other => return Err(format!("dtype {other} cannot be converted to f32")),
    }
    Ok(())
}

/// Encodes f32 values as F32, BF16 (round to nearest even) or F16 little-endian bytes, appended
/// to `out`.
pub fn encode_from_f32(dtype: StDtype, vals: &[f32], out: &mut Vec<u8>) -> std::result::Result<(), String> {
    out.reserve(vals.len() * dtype.size());
    match dtype {
        StDtype::F32 => vals.iter().for_each(|v| out.extend_from_slice(&v.to_le_bytes())),
        StDtype::BF16 => vals.iter().for_each(|v| out.extend_from_slice(&f32_to_bf16(*v).to_le_bytes())),
        StDtype::F16 => vals.iter().for_each(|v| out.extend_from_slice(&half::f16::from_f32(*v).to_bits().to_le_bytes())),
        other => return Err(format!("encoding f32 values as {other} is not supported (use F32, BF16 or F16)")),
    }
    Ok(())
}

/// One validated tensor entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub file_offset: u64,
    /// Bytes of data (= numel * dtype size).
    pub nbytes: u64,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An open, validated safetensors file. Data is read on demand; the struct is `Sync` (reads
/// take an internal lock on the file handle).
pub struct SafeTensorsFile {
    path: PathBuf,
    file: Mutex<File>,
    file_len: u64,
    tensors: BTreeMap<String, TensorInfo>,
    metadata: BTreeMap<String, String>,
}

impl std::fmt::Debug for SafeTensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafeTensorsFile").field("path", &self.path).field("tensors", &self.tensors.len()).finish()
    }
}

/// Keeps the order and duplicates of a JSON object's keys (serde_json's map silently keeps the
/// last of duplicate keys; a hostile file could hide a tensor that way).
struct OrderedObject(Vec<(String, serde_json::Value)>);

impl<'de> serde::Deserialize<'de> for OrderedObject {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = OrderedObject;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> std::result::Result<OrderedObject, A::Error> {
                let mut v = Vec::new();
                while let Some((k, val)) = m.next_entry::<String, serde_json::Value>()? {
                    v.push((k, val));
                }
                Ok(OrderedObject(v))
            }
        }
        d.deserialize_map(V)
    }
}

impl SafeTensorsFile {
    /// Opens and validates `path`; reads only the header.
    pub fn open(path: &Path) -> Result<SafeTensorsFile> {
        let err = |m: String| Error::file(path, m);
        let mut file = File::open(path).map_err(|e| err(format!("cannot open safetensors file: {e}")))?;
        let file_len = file.metadata().map_err(|e| err(format!("cannot stat: {e}")))?.len();
        if file_len < 8 {
            return Err(err(format!(
                "truncated safetensors file: {file_len} bytes, need at least 8 for the header length"
            )));
        }
        let mut lenb = [0u8; 8];
        file.read_exact(&mut lenb).map_err(|e| err(format!("cannot read header length: {e}")))?;
        let hlen = u64::from_le_bytes(lenb);
        if hlen > file_len - 8 {
            return Err(err(format!(
                "header length {hlen} runs past the end of the file ({} bytes after the length field); file truncated or not safetensors",
                file_len - 8
            )));
        }
        if hlen > MAX_HEADER_BYTES {
            return Err(err(format!("header length {hlen} exceeds the limit of {MAX_HEADER_BYTES} bytes")));
        }
        if hlen < 2 {
            return Err(err(format!("header length {hlen} is too small for a JSON object")));
        }
        let mut hbytes = vec![0u8; hlen as usize];
        file.read_exact(&mut hbytes).map_err(|e| err(format!("cannot read {hlen}-byte header: {e}")))?;
        let htext = std::str::from_utf8(&hbytes).map_err(|e| err(format!("header is not valid UTF-8: {e}")))?;
        let obj: OrderedObject = serde_json::from_str(htext.trim_end_matches([' ', '\0']))
            .map_err(|e| err(format!("header is not a valid JSON object: {e}")))?;
        let data_start = 8 + hlen;
        let data_len = file_len - data_start;

        let mut tensors = BTreeMap::new();
        let mut metadata = BTreeMap::new();
        let mut seen_meta = false;
        for (name, v) in obj.0 {
            if name == "__metadata__" {
                if seen_meta {
                    return Err(err("duplicate `__metadata__` entry in header".into()));
                }
                seen_meta = true;
                let m = v.as_object().ok_or_else(|| err(format!("`__metadata__` must be an object, got {v}")))?;
                for (k, x) in m {
                    let s = x
                        .as_str()
                        .ok_or_else(|| err(format!("`__metadata__` field `{k}` must be a string, got {x}")))?;
                    metadata.insert(k.clone(), s.to_string());
                }
                continue;
            }
            if tensors.contains_key(&name) {
                return Err(err(format!("tensor `{name}`: duplicate entry in header")));
            }
            let info = parse_entry(&name, &v, data_start, data_len).map_err(|m| err(format!("tensor `{name}`: {m}")))?;
            tensors.insert(name, info);
        }
        // No two tensors may share bytes.
        let mut spans: Vec<(&u64, &u64, &str)> =
            tensors.values().filter(|t| t.nbytes > 0).map(|t| (&t.file_offset, &t.nbytes, t.name.as_str())).collect();
        spans.sort();
        for w in spans.windows(2) {
            let (a_off, a_len, a) = w[0];
            let (b_off, _, b) = w[1];
            if a_off + a_len > *b_off {
                return Err(err(format!(
                    "tensors `{a}` and `{b}` overlap: `{a}` occupies data bytes {}..{}, `{b}` starts at {}",
                    a_off - data_start,
                    a_off + a_len - data_start,
                    b_off - data_start
                )));
            }
        }
        // Bytes past the last tensor belong to nothing: a file appended to, or two files joined.
        let end = spans.last().map_or(0, |(off, len, _)| *off + *len - data_start);
        if end < data_len {
            return Err(err(format!(
                "{} trailing bytes past the tensor data: the data section has {data_len} bytes, the tensors end at byte {end}",
                data_len - end
            )));
        }
        Ok(SafeTensorsFile { path: path.to_path_buf(), file: Mutex::new(file), file_len, tensors, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// All tensors, sorted by name.
    pub fn tensors(&self) -> &BTreeMap<String, TensorInfo> {
        &self.tensors
    }
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(|s| s.as_str())
    }
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
    pub fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.tensors
            .get(name)
            .ok_or_else(|| Error::file(&self.path, format!("tensor `{name}` is not in this file")))
    }
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    /// The raw little-endian bytes of tensor `name` (exactly the validated size).
    pub fn read_bytes(&self, name: &str) -> Result<Vec<u8>> {
        let info = self.info(name)?;
        let mut buf = vec![0u8; info.nbytes as usize];
        self.read_into(info, &mut buf)?;
        Ok(buf)
    }

    fn read_into(&self, info: &TensorInfo, buf: &mut [u8]) -> Result<()> {
        debug_assert_eq!(buf.len() as u64, info.nbytes);
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        f.seek(SeekFrom::Start(info.file_offset))
            .and_then(|_| f.read_exact(buf))
            .map_err(|e| {
                Error::file(
                    &self.path,
                    format!(
                        "tensor `{}`: cannot read {} bytes at offset {} (file was {} bytes when opened; changed since?): {e}",
                        info.name, info.nbytes, info.file_offset, self.file_len
                    ),
                )
            })
    }

    /// Tensor `name` converted to f32.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        let mut out = vec![0f32; info.numel()];
        self.read_f32_into(name, &mut out)?;
        Ok(out)
    }

    /// Tensor `name` converted to f32 into `out`, which must have exactly numel elements.
    pub fn read_f32_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        let info = self.info(name)?;
        if !info.dtype.converts_to_f32() {
            return Err(Error::file(&self.path, format!("tensor `{name}`: dtype {} cannot be converted to f32", info.dtype)));
        }
        if out.len() != info.numel() {
            return Err(Error::file(
                &self.path,
                format!("tensor `{name}`: destination holds {} elements, tensor has {} ({:?})", out.len(), info.numel(), info.shape),
            ));
        }
        let mut buf = vec![0u8; info.nbytes as usize];
        self.read_into(info, &mut buf)?;
        decode_to_f32(info.dtype, &buf, out).map_err(|m| Error::file(&self.path, format!("tensor `{name}`: {m}")))
    }
}

fn parse_entry(name: &str, v: &serde_json::Value, data_start: u64, data_len: u64) -> std::result::Result<TensorInfo, String> {
    let o = v.as_object().ok_or_else(|| format!("entry must be an object, got {v}"))?;
    for k in o.keys() {
        if !matches!(k.as_str(), "dtype" | "shape" | "data_offsets") {
            return Err(format!("unknown field `{k}`"));
        }
    }
    let dt = o.get("dtype").ok_or("missing field `dtype`")?;
    let dts = dt.as_str().ok_or_else(|| format!("field `dtype` must be a string, got {dt}"))?;
    let dtype = StDtype::parse(dts).ok_or_else(|| {
        format!("field `dtype`: unsupported dtype {dts:?} (expected one of F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL, F8_E4M3, F8_E5M2)")
    })?;
    let sh = o.get("shape").ok_or("missing field `shape`")?;
    let sha = sh.as_array().ok_or_else(|| format!("field `shape` must be an array, got {sh}"))?;
    let mut shape = Vec::with_capacity(sha.len().min(16));
    let mut numel: u64 = 1;
    for (i, d) in sha.iter().enumerate() {
        let d = d.as_u64().ok_or_else(|| format!("field `shape`[{i}] must be a non-negative integer, got {d}"))?;
        numel = numel.checked_mul(d).ok_or_else(|| format!("field `shape` {sh}: element count overflows"))?;
        shape.push(usize::try_from(d).map_err(|_| format!("field `shape`[{i}] = {d} does not fit in usize"))?);
    }
    usize::try_from(numel).map_err(|_| format!("field `shape` {sh}: element count does not fit in usize"))?;
    let nbytes = numel
        .checked_mul(dtype.size() as u64)
        .ok_or_else(|| format!("field `shape` {sh}: byte size overflows"))?;
    let off = o.get("data_offsets").ok_or("missing field `data_offsets`")?;
    let offa = off.as_array().ok_or_else(|| format!("field `data_offsets` must be an array, got {off}"))?;
    if offa.len() != 2 {
        return Err(format!("field `data_offsets` must have 2 elements [begin, end], got {off}"));
    }
    let begin = offa[0].as_u64().ok_or_else(|| format!("field `data_offsets`[0] must be a non-negative integer, got {}", offa[0]))?;
    let end = offa[1].as_u64().ok_or_else(|| format!("field `data_offsets`[1] must be a non-negative integer, got {}", offa[1]))?;
    if begin > end {
        return Err(format!("field `data_offsets`: begin {begin} > end {end}"));
    }
    if end > data_len {
        return Err(format!(
            "field `data_offsets` [{begin}, {end}] out of range: the data section has {data_len} bytes (file truncated?)"
        ));
    }
    if end - begin != nbytes {
        return Err(format!(
            "byte size mismatch: dtype {dtype} shape {shape:?} needs {nbytes} bytes, data_offsets [{begin}, {end}] give {}",
            end - begin
        ));
    }
    Ok(TensorInfo { name: name.to_string(), dtype, shape, file_offset: data_start + begin, nbytes })
}

/// What the writer needs to know about one tensor before its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn nbytes(&self) -> Option<usize> {
        self.shape.iter().try_fold(self.dtype.size(), |a, &d| a.checked_mul(d))
    }
}

/// A tensor held in memory, for [`write_safetensors`].
#[derive(Clone, Debug)]
pub struct TensorView<'a> {
    pub name: String,
    pub dtype: StDtype,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

/// Writes tensors held in memory (see [`write_safetensors_with`]).
pub fn write_safetensors(path: &Path, tensors: &[TensorView<'_>], metadata: Option<&BTreeMap<String, String>>) -> Result<()> {
    let by_name: BTreeMap<&str, &TensorView> = tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let specs: Vec<TensorSpec> =
        tensors.iter().map(|t| TensorSpec { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() }).collect();
    write_safetensors_with(path, &specs, metadata, |name, buf| {
        buf.extend_from_slice(by_name[name].data);
        Ok(())
    })
}

/// Streaming writer: `fill(name, buf)` is called once per tensor in name order and must append
/// exactly that tensor's bytes to the (cleared) `buf`, so only one tensor's bytes need to be in
/// memory at a time. Writes `path` atomically (temporary file, fsync, rename).
pub fn write_safetensors_with(
    path: &Path,
    specs: &[TensorSpec],
    metadata: Option<&BTreeMap<String, String>>,
    mut fill: impl FnMut(&str, &mut Vec<u8>) -> Result<()>,
) -> Result<()> {
    let err = |m: String| Error::file(path, m);
    let mut sorted: Vec<&TensorSpec> = specs.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let mut header = serde_json::Map::new();
    if let Some(m) = metadata {
        let mm: serde_json::Map<String, serde_json::Value> =
            m.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
        header.insert("__metadata__".into(), mm.into());
    }
    let mut offset: u64 = 0;
    for (i, s) in sorted.iter().enumerate() {
        if s.name == "__metadata__" {
            return Err(err("a tensor cannot be named `__metadata__`".into()));
        }
        if i > 0 && sorted[i - 1].name == s.name {
            return Err(err(format!("tensor `{}` given twice", s.name)));
        }
        let n = s.nbytes().ok_or_else(|| err(format!("tensor `{}`: byte size overflows", s.name)))? as u64;
        header.insert(
            s.name.clone(),
            serde_json::json!({"dtype": s.dtype.name(), "shape": s.shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    let mut htext = serde_json::to_string(&serde_json::Value::Object(header)).map_err(|e| err(e.to_string()))?;
    while htext.len() % 8 != 0 {
        htext.push(' ');
    }
    let tmp = tmp_name(path);
    let result = (|| -> Result<()> {
        let f = File::create(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
        let mut w = BufWriter::with_capacity(1 << 22, f);
        let io = |e: std::io::Error| Error::file(&tmp, format!("write failed: {e}"));
        w.write_all(&(htext.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(htext.as_bytes()).map_err(io)?;
        let mut buf = Vec::new();
        for s in &sorted {
            buf.clear();
            fill(&s.name, &mut buf)?;
            let n = s.nbytes().unwrap();
            if buf.len() != n {
                return Err(err(format!(
                    "tensor `{}`: {} bytes given, dtype {} shape {:?} needs {n}",
                    s.name,
                    buf.len(),
                    s.dtype,
                    s.shape
                )));
            }
            w.write_all(&buf).map_err(io)?;
        }
        let f = w.into_inner().map_err(|e| io(e.into_error()))?;
        f.sync_all().map_err(io)?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(format!("cannot rename {} into place: {e}", tmp.display()))
    })?;
    sync_parent(path);
    Ok(())
}

/// `dir/.name.tmp.<pid>` next to `path`.
pub(crate) fn tmp_name(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "out".into());
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Best-effort fsync of the directory holding `path` (makes a rename durable).
pub(crate) fn sync_parent(path: &Path) {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if let Ok(d) = File::open(parent) {
        let _ = d.sync_all();
    }
}
