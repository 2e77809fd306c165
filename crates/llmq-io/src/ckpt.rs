//! A crash-safe checkpoint store. The trainer decides what goes in (named tensors as raw bytes
//! plus a JSON state); this module makes sure a checkpoint is either complete and intact or never
//! used.
//!
//! On disk: `root/step_NNNNNNNN/` (8 digits, more for steps past 10^8) holding one raw
//! little-endian file per tensor (`NNNNN_<name>.bin`) and `manifest.json`:
//! `{"format": "llmq-checkpoint", "version": 1, "step", "state", "files": [{"file", "name",
//! "dtype", "shape", "bytes", "xxh64"}]}`.
//!
//! Writing: everything goes into `root/.tmp_step_NNNNNNNN_<pid>/`, each file fsynced, the manifest
//! last, then the directory is fsynced, renamed to its final name and the root directory fsynced.
//! A crash at any point leaves either no `step_*` directory or a complete one. Rewriting an
//! existing step moves the old directory aside first (to `.tmp_old_...`) and deletes it after the
//! new one is in place.
//!
//! Checking: [`list_complete`] checks that the manifest parses and every file has its recorded
//! size (cheap); [`latest_complete`] and [`load_checkpoint`] also verify every checksum (XXH64,
//! implemented here).

use llmq_core::{DType, Error, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const MANIFEST: &str = "manifest.json";
const FORMAT: &str = "llmq-checkpoint";

// ---------------------------------------------------------------------------------------------
// XXH64
// ---------------------------------------------------------------------------------------------

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

/// Streaming XXH64 (seed 0 by default), matching the reference xxHash implementation.
#[derive(Clone, Debug)]
pub struct Xxh64 {
    v: [u64; 4],
    seed: u64,
    total: u64,
    buf: [u8; 32],
    buf_len: usize,
}

#[inline]
fn round(acc: u64, x: u64) -> u64 {
    acc.wrapping_add(x.wrapping_mul(P2)).rotate_left(31).wrapping_mul(P1)
}
#[inline]
fn merge(acc: u64, v: u64) -> u64 {
    (acc ^ round(0, v)).wrapping_mul(P1).wrapping_add(P4)
}
#[inline]
fn rd64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().unwrap())
}

impl Default for Xxh64 {
    fn default() -> Self {
        Xxh64::new(0)
    }
}

impl Xxh64 {
    pub fn new(seed: u64) -> Xxh64 {
        Xxh64 {
            v: [seed.wrapping_add(P1).wrapping_add(P2), seed.wrapping_add(P2), seed, seed.wrapping_sub(P1)],
            seed,
            total: 0,
            buf: [0; 32],
            buf_len: 0,
        }
    }
    fn stripe(v: &mut [u64; 4], s: &[u8]) {
        v[0] = round(v[0], rd64(&s[0..]));
        v[1] = round(v[1], rd64(&s[8..]));
        v[2] = round(v[2], rd64(&s[16..]));
        v[3] = round(v[3], rd64(&s[24..]));
    }
    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.buf_len > 0 {
            let take = (32 - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < 32 {
                return;
            }
            let b = self.buf;
            Self::stripe(&mut self.v, &b);
            self.buf_len = 0;
        }
        let mut chunks = data.chunks_exact(32);
        for s in &mut chunks {
            Self::stripe(&mut self.v, s);
        }
        let rest = chunks.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }
    pub fn digest(&self) -> u64 {
        let mut h = if self.total >= 32 {
            let v = self.v;
            let mut h = v[0].rotate_left(1).wrapping_add(v[1].rotate_left(7)).wrapping_add(v[2].rotate_left(12)).wrapping_add(v[3].rotate_left(18));
            for x in v {
                h = merge(h, x);
            }
            h
        } else {
            self.seed.wrapping_add(P5)
        };
        h = h.wrapping_add(self.total);
        let mut rest = &self.buf[..self.buf_len];
        while rest.len() >= 8 {
            h = (h ^ round(0, rd64(rest))).rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            let k = u32::from_le_bytes(rest[..4].try_into().unwrap()) as u64;
            h = (h ^ k.wrapping_mul(P1)).rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            rest = &rest[4..];
        }
        for &b in rest {
            h = (h ^ (b as u64).wrapping_mul(P5)).rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }
}

/// XXH64 of `data` with seed 0.
pub fn xxh64(data: &[u8]) -> u64 {
    let mut h = Xxh64::new(0);
    h.update(data);
    h.digest()
}

// ---------------------------------------------------------------------------------------------
// Tensors as bytes
// ---------------------------------------------------------------------------------------------

/// A named tensor to store: raw little-endian bytes of `dtype` with `shape`.
#[derive(Clone, Copy, Debug)]
pub struct TensorRef<'a> {
    pub name: &'a str,
    pub dtype: DType,
    pub shape: &'a [usize],
    pub data: &'a [u8],
}

/// A tensor read back from a checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadedTensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl LoadedTensor {
    /// The data as f32 values (requires dtype F32).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        if self.dtype != DType::F32 {
            return Err(Error::Op(format!("checkpoint tensor `{}` is {}, not fp32", self.name, self.dtype)));
        }
        Ok(bytes_to_f32(&self.data))
    }
}

/// The bytes of an f32 slice (little-endian hosts; llmq targets x86-64 and aarch64).
pub fn f32_as_bytes(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and every byte pattern is a valid u8; the length is exact.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// The bytes of a u16 slice (bf16 data), little-endian hosts.
pub fn u16_as_bytes(v: &[u16]) -> &[u8] {
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

pub fn bytes_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

pub fn bytes_to_u16(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// `root/step_NNNNNNNN`.
pub fn checkpoint_dir(root: &Path, step: u64) -> PathBuf {
    root.join(format!("step_{step:08}"))
}

fn sanitize(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' { c } else { '_' })
        .take(100)
        .collect();
    s
}

fn sync_dir(p: &Path) -> std::io::Result<()> {
    File::open(p)?.sync_all()
}

/// Writes a checkpoint for `step` under `root` (created if needed) and returns its directory.
pub fn write_checkpoint(root: &Path, step: u64, tensors: &[TensorRef<'_>], state: &serde_json::Value) -> Result<PathBuf> {
    std::fs::create_dir_all(root).map_err(|e| Error::file(root, format!("cannot create checkpoint root: {e}")))?;
    let pid = std::process::id();
    let tmp = root.join(format!(".tmp_step_{step:08}_{pid}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::file(&tmp, format!("cannot remove stale directory: {e}")))?;
    }
    std::fs::create_dir(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
    let r = write_into(&tmp, step, tensors, state);
    if let Err(e) = r {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    let fin = checkpoint_dir(root, step);
    let mut old = None;
    if fin.exists() {
        let aside = root.join(format!(".tmp_old_step_{step:08}_{pid}"));
        let _ = std::fs::remove_dir_all(&aside);
        std::fs::rename(&fin, &aside).map_err(|e| Error::file(&fin, format!("cannot move the old checkpoint aside: {e}")))?;
        old = Some(aside);
    }
    std::fs::rename(&tmp, &fin).map_err(|e| Error::file(&fin, format!("cannot rename {} into place: {e}", tmp.display())))?;
    sync_dir(root).map_err(|e| Error::file(root, format!("cannot fsync the checkpoint root: {e}")))?;
    if let Some(o) = old {
        let _ = std::fs::remove_dir_all(o);
    }
    Ok(fin)
}

fn write_into(dir: &Path, step: u64, tensors: &[TensorRef<'_>], state: &serde_json::Value) -> Result<()> {
    let mut entries = Vec::with_capacity(tensors.len());
    let mut names = std::collections::BTreeSet::new();
    for (i, t) in tensors.iter().enumerate() {
        if !names.insert(t.name) {
            return Err(Error::Op(format!("checkpoint: tensor `{}` given twice", t.name)));
        }
        let numel = t.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let want = numel.and_then(|n| n.checked_mul(t.dtype.size()));
        if want != Some(t.data.len()) {
            return Err(Error::Op(format!(
                "checkpoint: tensor `{}` has {} bytes, dtype {} shape {:?} needs {want:?}",
                t.name,
                t.data.len(),
                t.dtype,
                t.shape
            )));
        }
        let fname = format!("{i:05}_{}.bin", sanitize(t.name));
        let p = dir.join(&fname);
        let io = |e: std::io::Error| Error::file(&p, format!("cannot write checkpoint file: {e}"));
        let mut f = File::create(&p).map_err(io)?;
        f.write_all(t.data).map_err(io)?;
        f.sync_all().map_err(io)?;
        entries.push(serde_json::json!({
            "file": fname,
            "name": t.name,
            "dtype": t.dtype,
            "shape": t.shape,
            "bytes": t.data.len(),
            "xxh64": format!("{:016x}", xxh64(t.data)),
        }));
    }
    let manifest = serde_json::json!({
        "format": FORMAT,
        "version": 1,
        "step": step,
        "state": state,
        "files": entries,
    });
    let text = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Op(e.to_string()))?;
    let p = dir.join(MANIFEST);
    let io = |e: std::io::Error| Error::file(&p, format!("cannot write manifest: {e}"));
    let mut f = File::create(&p).map_err(io)?;
    f.write_all(&text).map_err(io)?;
    f.sync_all().map_err(io)?;
    sync_dir(dir).map_err(|e| Error::file(dir, format!("cannot fsync: {e}")))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct FileEntry {
    file: String,
    name: String,
    dtype: DType,
    shape: Vec<usize>,
    bytes: u64,
    xxh64: u64,
}

#[derive(Clone, Debug)]
struct Manifest {
    step: u64,
    state: serde_json::Value,
    files: Vec<FileEntry>,
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let p = dir.join(MANIFEST);
    let err = |m: String| Error::file(&p, m);
    let text = std::fs::read(&p).map_err(|e| err(format!("incomplete checkpoint: cannot read manifest: {e}")))?;
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| err(format!("manifest is not valid JSON: {e}")))?;
    if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(err(format!("field `format`: expected {FORMAT:?}")));
    }
    if v.get("version").and_then(|f| f.as_u64()) != Some(1) {
        return Err(err("field `version`: expected 1".into()));
    }
    let step = v.get("step").and_then(|s| s.as_u64()).ok_or_else(|| err("missing integer field `step`".into()))?;
    let state = v.get("state").cloned().ok_or_else(|| err("missing field `state`".into()))?;
    let arr = v.get("files").and_then(|f| f.as_array()).ok_or_else(|| err("missing array field `files`".into()))?;
    let mut files = Vec::with_capacity(arr.len());
    for (i, e) in arr.iter().enumerate() {
        let s = |k: &str| -> Result<&str> {
            e.get(k).and_then(|x| x.as_str()).ok_or_else(|| err(format!("files[{i}]: missing string field `{k}`")))
        };
        let file = s("file")?.to_string();
        if file.contains('/') || file.contains('\\') || file.starts_with('.') || file == MANIFEST {
            return Err(err(format!("files[{i}]: bad file name {file:?}")));
        }
        let dtype: DType = serde_json::from_value(e.get("dtype").cloned().unwrap_or_default())
            .map_err(|x| err(format!("files[{i}]: field `dtype`: {x}")))?;
        let shape: Vec<usize> = serde_json::from_value(e.get("shape").cloned().unwrap_or_default())
            .map_err(|x| err(format!("files[{i}]: field `shape`: {x}")))?;
        let bytes = e.get("bytes").and_then(|b| b.as_u64()).ok_or_else(|| err(format!("files[{i}]: missing field `bytes`")))?;
        let want = shape.iter().try_fold(dtype.size() as u64, |a, &d| a.checked_mul(d as u64));
        if want != Some(bytes) {
            return Err(err(format!("files[{i}]: {bytes} bytes do not match dtype {dtype} shape {shape:?}")));
        }
        let xxh = u64::from_str_radix(s("xxh64")?, 16).map_err(|x| err(format!("files[{i}]: field `xxh64`: {x}")))?;
        files.push(FileEntry { file, name: s("name")?.to_string(), dtype, shape, bytes, xxh64: xxh });
    }
    Ok(Manifest { step, state, files })
}

/// Sizes only: the manifest parses and every listed file exists with its recorded size.
fn check_sizes(dir: &Path) -> Result<Manifest> {
    let m = read_manifest(dir)?;
    for f in &m.files {
        let p = dir.join(&f.file);
        let len = std::fs::metadata(&p).map_err(|e| Error::file(&p, format!("checkpoint file missing: {e}")))?.len();
        if len != f.bytes {
            return Err(Error::file(&p, format!("checkpoint file `{}` has {len} bytes, manifest says {}", f.name, f.bytes)));
        }
    }
    Ok(m)
}

fn read_verified(dir: &Path, f: &FileEntry) -> Result<Vec<u8>> {
    let p = dir.join(&f.file);
    let mut file = File::open(&p).map_err(|e| Error::file(&p, format!("checkpoint file missing: {e}")))?;
    let len = file.metadata().map_err(|e| Error::file(&p, format!("cannot stat: {e}")))?.len();
    if len != f.bytes {
        return Err(Error::file(&p, format!("checkpoint file `{}` has {len} bytes, manifest says {}", f.name, f.bytes)));
    }
    let mut data = vec![0u8; f.bytes as usize];
    file.read_exact(&mut data).map_err(|e| Error::file(&p, format!("cannot read: {e}")))?;
    let h = xxh64(&data);
    if h != f.xxh64 {
        return Err(Error::file(&p, format!("checkpoint file `{}` is corrupt: xxh64 {h:016x}, manifest says {:016x}", f.name, f.xxh64)));
    }
    Ok(data)
}

fn verify_checksums(dir: &Path, m: &Manifest) -> Result<()> {
    let mut buf = vec![0u8; 1 << 22];
    for f in &m.files {
        let p = dir.join(&f.file);
        let mut file = File::open(&p).map_err(|e| Error::file(&p, format!("checkpoint file missing: {e}")))?;
        let mut h = Xxh64::new(0);
        let mut total = 0u64;
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::file(&p, format!("cannot read: {e}")))?;
            if n == 0 {
                break;
            }
            total += n as u64;
            h.update(&buf[..n]);
        }
        if total != f.bytes {
            return Err(Error::file(&p, format!("checkpoint file `{}` has {total} bytes, manifest says {}", f.name, f.bytes)));
        }
        if h.digest() != f.xxh64 {
            return Err(Error::file(&p, format!("checkpoint file `{}` is corrupt: checksum mismatch", f.name)));
        }
    }
    Ok(())
}

fn parse_step_dir(name: &str) -> Option<u64> {
    let d = name.strip_prefix("step_")?;
    if d.len() < 8 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    d.parse().ok()
}

/// All `step_*` directories of `root` (complete or not), sorted by step.
fn step_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let rd = match std::fs::read_dir(root) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::file(root, format!("cannot list checkpoint directory: {e}"))),
    };
    let mut v = Vec::new();
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(s) = parse_step_dir(&name) {
            if e.path().is_dir() {
                v.push((s, e.path()));
            }
        }
    }
    v.sort();
    Ok(v)
}

/// Steps (ascending) whose checkpoint has a valid manifest, matching step number and files of
/// the recorded sizes. Checksums are not read here (see [`latest_complete`]).
pub fn list_complete(root: &Path) -> Result<Vec<u64>> {
    Ok(step_dirs(root)?
        .into_iter()
        .filter(|(s, d)| matches!(check_sizes(d), Ok(m) if m.step == *s))
        .map(|(s, _)| s)
        .collect())
}

/// The newest checkpoint that passes the full check (sizes and every checksum); older ones are
/// tried when a newer one fails.
pub fn latest_complete(root: &Path) -> Result<Option<(u64, PathBuf)>> {
    for (s, d) in step_dirs(root)?.into_iter().rev() {
        if let Ok(m) = check_sizes(&d) {
            if m.step == s && verify_checksums(&d, &m).is_ok() {
                return Ok(Some((s, d)));
            }
        }
    }
    Ok(None)
}

/// Fully verifies the checkpoint in `dir` without loading it; the error says what is wrong.
pub fn verify_checkpoint(dir: &Path) -> Result<u64> {
    let m = check_sizes(dir)?;
    verify_checksums(dir, &m)?;
    Ok(m.step)
}

/// A checkpoint read back and verified.
#[derive(Clone, Debug)]
pub struct LoadedCheckpoint {
    pub path: PathBuf,
    pub step: u64,
    pub state: serde_json::Value,
    pub tensors: Vec<LoadedTensor>,
}

impl LoadedCheckpoint {
    pub fn tensor(&self, name: &str) -> Result<&LoadedTensor> {
        self.tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::file(&self.path, format!("checkpoint has no tensor `{name}`")))
    }
}

/// Loads the checkpoint in `dir`, verifying the manifest, every size and every checksum.
pub fn load_checkpoint(dir: &Path) -> Result<LoadedCheckpoint> {
    let m = read_manifest(dir)?;
    if let Some(s) = dir.file_name().and_then(|n| parse_step_dir(&n.to_string_lossy())) {
        if s != m.step {
            return Err(Error::file(dir, format!("directory is step {s}, manifest says step {}", m.step)));
        }
    }
    let mut tensors = Vec::with_capacity(m.files.len());
    for f in &m.files {
        let data = read_verified(dir, f)?;
        tensors.push(LoadedTensor { name: f.name.clone(), dtype: f.dtype, shape: f.shape.clone(), data });
    }
    Ok(LoadedCheckpoint { path: dir.to_path_buf(), step: m.step, state: m.state, tensors })
}

/// Resolves `--continue [step|path]`: `None` -> the latest complete checkpoint under `root`
/// (error if none); a number -> `root/step_N`; anything else -> that directory.
pub fn resolve_continue(root: &Path, arg: Option<&str>) -> Result<PathBuf> {
    match arg {
        None | Some("") | Some("latest") => latest_complete(root)?.map(|(_, p)| p).ok_or_else(|| {
            Error::file(root, "no complete checkpoint to continue from (none found, or all failed verification)")
        }),
        Some(a) if a.bytes().all(|b| b.is_ascii_digit()) => {
            let s: u64 = a.parse().map_err(|_| Error::Config(format!("bad checkpoint step {a:?}")))?;
            let d = checkpoint_dir(root, s);
            if !d.is_dir() {
                return Err(Error::file(&d, format!("no checkpoint for step {s}; complete ones: {:?}", list_complete(root)?)));
            }
            Ok(d)
        }
        Some(a) => {
            let d = PathBuf::from(a);
            if !d.is_dir() {
                return Err(Error::file(&d, "checkpoint directory does not exist"));
            }
            Ok(d)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Retention
// ---------------------------------------------------------------------------------------------

fn pid_alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    if Path::new("/proc/self").exists() {
        Path::new(&format!("/proc/{pid}")).exists()
    } else {
        false
    }
}

/// Deletes complete checkpoints other than the newest `keep_last` and those whose step is a
/// multiple of `keep_major_every`, and stale `.tmp_*` directories (whose writer process is gone).
/// Incomplete `step_*` directories are left alone (they are never chosen for loading). Returns
/// the removed directories.
pub fn prune(root: &Path, keep_last: usize, keep_major_every: Option<u64>) -> Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let complete = list_complete(root)?;
    let cut = complete.len().saturating_sub(keep_last);
    for &s in &complete[..cut] {
        if keep_major_every.is_some_and(|m| m > 0 && s % m == 0) {
            continue;
        }
        let d = checkpoint_dir(root, s);
        let d = if d.is_dir() {
            d
        } else {
            // a step past 10^8 or unusual zero padding: find the directory by number
            match step_dirs(root)?.into_iter().find(|(x, _)| *x == s) {
                Some((_, p)) => p,
                None => continue,
            }
        };
        std::fs::remove_dir_all(&d).map_err(|e| Error::file(&d, format!("cannot delete old checkpoint: {e}")))?;
        removed.push(d);
    }
    if let Ok(rd) = std::fs::read_dir(root) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.starts_with(".tmp_") || !e.path().is_dir() {
                continue;
            }
            let pid = name.rsplit('_').next().and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(pid_alive) {
                continue;
            }
            std::fs::remove_dir_all(e.path()).map_err(|x| Error::file(e.path(), format!("cannot delete stale directory: {x}")))?;
            removed.push(e.path());
        }
    }
    Ok(removed)
}
