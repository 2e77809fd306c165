//! A crash-safe checkpoint store. The trainer decides what goes in (named tensors as raw bytes
//! plus a JSON state); this module makes sure a checkpoint is either complete and intact or never
//! used.
//!
//! On disk: `root/step_NNNNNNNN/` (8 digits, more for steps past 10^8) holding one raw
//! little-endian file per tensor (`NNNNN_<name>.bin`), `manifest.json`:
//! `{"format": "llmq-checkpoint", "version": 2, "step", "lineage", "state", "files": [{"file",
//! "name", "dtype", "shape", "bytes", "xxh64"}]}`, and the commit record `commit.json`
//! (`{"manifest_bytes", "manifest_xxh64"}`), written last: a manifest that does not match it
//! (edited or damaged) makes the checkpoint unusable.
//!
//! Lineage: every run has an id; a checkpoint records it and the chain of checkpoints the run
//! descends from (see [`Lineage`]), so that retention and "latest" can follow one line of runs
//! (`crate::retention`).
//!
//! Writing: everything goes into `root/.tmp_step_NNNNNNNN_<pid>/`, each file fsynced, the manifest
//! and then the commit record last, then the directory is fsynced, renamed to its final name and
//! the root directory fsynced.
//! A crash at any point leaves either no `step_*` directory or a complete one. Rewriting an
//! existing step moves the old directory aside first (to `.tmp_old_...`) and deletes it after the
//! new one is in place.
//!
//! Checking: [`list_complete`] checks the commit record, the manifest and that every file has its
//! recorded size (cheap); [`latest_verified`] and [`load_checkpoint`] also verify every checksum;
//! [`open_checkpoint`] reads one tensor at a time, checking each file's checksum as it is read.
//! [`CheckpointWriter`] writes one tensor at a time, so that neither side holds the whole state.

use llmq_core::{DType, Error, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub use crate::xxh64::{xxh64, Xxh64};

pub const MANIFEST: &str = "manifest.json";
pub const COMMIT: &str = "commit.json";
const FORMAT: &str = "llmq-checkpoint";
const VERSION: u64 = 2;
/// Bound on a manifest's size: it lists names and shapes, never data.
const MAX_MANIFEST_BYTES: u64 = 64 << 20;

/// Where a checkpoint comes from: the id of the run that wrote it and the checkpoints that run
/// descends from, oldest first, as (run id, step) of each resume point.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lineage {
    pub run: String,
    pub ancestry: Vec<(String, u64)>,
}

impl Lineage {
    /// A run that starts from nothing, with a fresh id (time and process id).
    pub fn fresh() -> Lineage {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Lineage { run: format!("{:x}-{:x}", t.as_micros(), std::process::id()), ancestry: vec![] }
    }

    /// A new run resuming from checkpoint `step` of `parent`.
    pub fn resumed_from(parent: &Lineage, step: u64) -> Lineage {
        let mut ancestry = parent.ancestry.clone();
        ancestry.push((parent.run.clone(), step));
        Lineage { run: Lineage::fresh().run, ancestry }
    }

    /// The id of the first run of this line (this run's own where it resumed none): a log's
    /// records of every segment of the line carry it, so a plot draws them as one curve.
    pub fn series(&self) -> &str {
        self.ancestry.first().map_or(&self.run, |(run, _)| run)
    }

    /// The checkpoint this run resumed from, if any.
    pub fn parent(&self) -> Option<&(String, u64)> {
        self.ancestry.last()
    }

    /// Whether checkpoint `step` of run `run` is on the line of a checkpoint of this lineage at
    /// `head_step`: written by this run no later, or by an ancestor run up to its resume point.
    pub fn contains(&self, head_step: u64, run: &str, step: u64) -> bool {
        (run == self.run && step <= head_step) || self.ancestry.iter().any(|(r, s)| r == run && step <= *s)
    }
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
pub fn write_checkpoint(root: &Path, step: u64, lineage: &Lineage, tensors: &[TensorRef<'_>], state: &serde_json::Value) -> Result<PathBuf> {
    let mut w = CheckpointWriter::create(root, step)?;
    for t in tensors {
        w.add(t)?;
    }
    w.finish(lineage, state)
}

/// A checkpoint being written one tensor at a time (so that the host holds one tensor, not the
/// whole state): files go into the temporary directory as they come, `finish` writes the
/// manifest and the commit record and moves the directory into place. Dropped unfinished, the
/// temporary directory is removed.
pub struct CheckpointWriter {
    root: PathBuf,
    step: u64,
    tmp: PathBuf,
    entries: Vec<serde_json::Value>,
    names: std::collections::BTreeSet<String>,
    finished: bool,
}

impl CheckpointWriter {
    pub fn create(root: &Path, step: u64) -> Result<CheckpointWriter> {
        std::fs::create_dir_all(root).map_err(|e| Error::file(root, format!("cannot create checkpoint root: {e}")))?;
        let tmp = root.join(format!(".tmp_step_{step:08}_{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::file(&tmp, format!("cannot remove stale directory: {e}")))?;
        }
        std::fs::create_dir(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
        Ok(CheckpointWriter { root: root.to_path_buf(), step, tmp, entries: vec![], names: Default::default(), finished: false })
    }

    /// Writes one tensor's file (fsynced).
    pub fn add(&mut self, t: &TensorRef<'_>) -> Result<()> {
        if !self.names.insert(t.name.to_string()) {
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
        let fname = format!("{:05}_{}.bin", self.entries.len(), sanitize(t.name));
        let p = self.tmp.join(&fname);
        let io = |e: std::io::Error| Error::file(&p, format!("cannot write checkpoint file: {e}"));
        let mut f = File::create(&p).map_err(io)?;
        f.write_all(t.data).map_err(io)?;
        f.sync_all().map_err(io)?;
        self.entries.push(serde_json::json!({
            "file": fname,
            "name": t.name,
            "dtype": t.dtype,
            "shape": t.shape,
            "bytes": t.data.len(),
            "xxh64": format!("{:016x}", xxh64(t.data)),
        }));
        Ok(())
    }

    /// The manifest and commit record, then the directory into place (replacing an older one of
    /// the same step); returns the checkpoint's directory.
    pub fn finish(mut self, lineage: &Lineage, state: &serde_json::Value) -> Result<PathBuf> {
        let manifest = serde_json::json!({
            "format": FORMAT,
            "version": VERSION,
            "step": self.step,
            "lineage": lineage,
            "state": state,
            "files": self.entries,
        });
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::Op(e.to_string()))?;
        let commit = serde_json::json!({"manifest_bytes": text.len(), "manifest_xxh64": format!("{:016x}", xxh64(&text))});
        for (name, bytes) in [(MANIFEST, text), (COMMIT, commit.to_string().into_bytes())] {
            let p = self.tmp.join(name);
            let io = |e: std::io::Error| Error::file(&p, format!("cannot write: {e}"));
            let mut f = File::create(&p).map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        sync_dir(&self.tmp).map_err(|e| Error::file(&self.tmp, format!("cannot fsync: {e}")))?;
        let (root, step) = (self.root.clone(), self.step);
        let fin = checkpoint_dir(&root, step);
        let mut old = None;
        if fin.exists() {
            let aside = root.join(format!(".tmp_old_step_{step:08}_{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&aside);
            std::fs::rename(&fin, &aside).map_err(|e| Error::file(&fin, format!("cannot move the old checkpoint aside: {e}")))?;
            old = Some(aside);
        }
        std::fs::rename(&self.tmp, &fin).map_err(|e| Error::file(&fin, format!("cannot rename {} into place: {e}", self.tmp.display())))?;
        self.finished = true;
        sync_dir(&root).map_err(|e| Error::file(&root, format!("cannot fsync the checkpoint root: {e}")))?;
        if let Some(o) = old {
            let _ = std::fs::remove_dir_all(o);
        }
        Ok(fin)
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
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
    lineage: Lineage,
    state: serde_json::Value,
    files: Vec<FileEntry>,
}

/// A small file of the checkpoint, refused past `MAX_MANIFEST_BYTES` before it is read.
fn read_small(p: &Path, what: &str) -> Result<Vec<u8>> {
    let len = std::fs::metadata(p).map_err(|e| Error::file(p, format!("incomplete checkpoint: cannot read {what}: {e}")))?.len();
    if len > MAX_MANIFEST_BYTES {
        return Err(Error::file(p, format!("{what} has {len} bytes, more than the {MAX_MANIFEST_BYTES} a checkpoint's {what} can have")));
    }
    std::fs::read(p).map_err(|e| Error::file(p, format!("incomplete checkpoint: cannot read {what}: {e}")))
}

/// The manifest's bytes, checked against the commit record written after it.
fn read_committed(dir: &Path) -> Result<Vec<u8>> {
    let cp = dir.join(COMMIT);
    let mp = dir.join(MANIFEST);
    let text = read_small(&mp, "manifest")?;
    let commit = read_small(&cp, "commit record")?;
    let c: serde_json::Value =
        serde_json::from_slice(&commit).map_err(|e| Error::file(&cp, format!("commit record is not valid JSON: {e}")))?;
    let bytes = c.get("manifest_bytes").and_then(|b| b.as_u64());
    let hash = c.get("manifest_xxh64").and_then(|h| h.as_str()).and_then(|h| u64::from_str_radix(h, 16).ok());
    let (Some(bytes), Some(hash)) = (bytes, hash) else {
        return Err(Error::file(&cp, "commit record: expected fields `manifest_bytes` (integer) and `manifest_xxh64` (hex)"));
    };
    let got = xxh64(&text);
    if bytes != text.len() as u64 || hash != got {
        return Err(Error::file(
            &mp,
            format!(
                "manifest does not match its commit record (edited or damaged): {} bytes xxh64 {got:016x}, the record says {bytes} bytes xxh64 {hash:016x}",
                text.len()
            ),
        ));
    }
    Ok(text)
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let p = dir.join(MANIFEST);
    let err = |m: String| Error::file(&p, m);
    let text = read_committed(dir)?;
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| err(format!("manifest is not valid JSON: {e}")))?;
    if v.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(err(format!("field `format`: expected {FORMAT:?}")));
    }
    let version = v.get("version").and_then(|f| f.as_u64());
    if version != Some(VERSION) {
        return Err(err(format!("field `version`: expected {VERSION}, got {version:?} (version 1 checkpoints have no commit record or lineage)")));
    }
    let step = v.get("step").and_then(|s| s.as_u64()).ok_or_else(|| err("missing integer field `step`".into()))?;
    let lineage: Lineage = serde_json::from_value(v.get("lineage").cloned().unwrap_or_default())
        .map_err(|e| err(format!("field `lineage`: {e}")))?;
    let state = v.get("state").cloned().ok_or_else(|| err("missing field `state`".into()))?;
    let arr = v.get("files").and_then(|f| f.as_array()).ok_or_else(|| err("missing array field `files`".into()))?;
    let mut files: Vec<FileEntry> = Vec::with_capacity(arr.len());
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
        let name = s("name")?.to_string();
        if let Some(o) = files.iter().find(|o| o.name == name || o.file == file) {
            return Err(err(format!("files[{i}]: tensor `{name}` in file {file:?} repeats tensor `{}` in file {:?}", o.name, o.file)));
        }
        files.push(FileEntry { file, name, dtype, shape, bytes, xxh64: xxh });
    }
    Ok(Manifest { step, lineage, state, files })
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
pub(crate) fn step_dirs(root: &Path) -> Result<Vec<(u64, PathBuf)>> {
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
    Ok(latest_verified(root)?.found)
}

/// The newest fully checked checkpoint (step and directory), if any, and a line for each newer
/// one skipped, saying why.
pub struct Latest {
    pub found: Option<(u64, PathBuf)>,
    pub skipped: Vec<String>,
}

/// As [`latest_complete`], saying why each newer checkpoint was skipped.
pub fn latest_verified(root: &Path) -> Result<Latest> {
    let mut skipped = vec![];
    for (s, d) in step_dirs(root)?.into_iter().rev() {
        match verify_checkpoint(&d) {
            Ok(_) => return Ok(Latest { found: Some((s, d)), skipped }),
            Err(e) => skipped.push(format!("skipped {}: {e}", d.display())),
        }
    }
    Ok(Latest { found: None, skipped })
}

/// The step and lineage of the checkpoint in `dir` (commit record, manifest and file sizes
/// checked; checksums not read).
pub fn checkpoint_info(dir: &Path) -> Result<(u64, Lineage)> {
    let m = check_sizes(dir)?;
    check_dir_step(dir, m.step)?;
    Ok((m.step, m.lineage))
}

/// The JSON state of the checkpoint in `dir`, checked as [`checkpoint_info`] checks it (tensor
/// data not read).
pub fn checkpoint_state(dir: &Path) -> Result<serde_json::Value> {
    let m = check_sizes(dir)?;
    check_dir_step(dir, m.step)?;
    Ok(m.state)
}

fn check_dir_step(dir: &Path, step: u64) -> Result<()> {
    match dir.file_name().and_then(|n| parse_step_dir(&n.to_string_lossy())) {
        Some(s) if s != step => Err(Error::file(dir, format!("directory is step {s}, manifest says step {step}"))),
        _ => Ok(()),
    }
}

/// Fully verifies the checkpoint in `dir` without loading it; the error says what is wrong.
pub fn verify_checkpoint(dir: &Path) -> Result<u64> {
    let m = check_sizes(dir)?;
    check_dir_step(dir, m.step)?;
    verify_checksums(dir, &m)?;
    Ok(m.step)
}

/// A checkpoint read back and verified.
#[derive(Clone, Debug)]
pub struct LoadedCheckpoint {
    pub path: PathBuf,
    pub step: u64,
    pub lineage: Lineage,
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
    let ck = open_checkpoint(dir)?;
    let tensors = ck.files.iter().map(|f| ck.read(&f.name)).collect::<Result<Vec<_>>>()?;
    Ok(LoadedCheckpoint { path: ck.path, step: ck.step, lineage: ck.lineage, state: ck.state, tensors })
}

/// A checkpoint whose manifest (against its commit record) and file sizes are checked, read one
/// tensor at a time (each checked against its checksum as it is read).
#[derive(Clone, Debug)]
pub struct OpenCheckpoint {
    pub path: PathBuf,
    pub step: u64,
    pub lineage: Lineage,
    pub state: serde_json::Value,
    files: Vec<FileEntry>,
}

pub fn open_checkpoint(dir: &Path) -> Result<OpenCheckpoint> {
    let m = check_sizes(dir)?;
    check_dir_step(dir, m.step)?;
    Ok(OpenCheckpoint { path: dir.to_path_buf(), step: m.step, lineage: m.lineage, state: m.state, files: m.files })
}

impl OpenCheckpoint {
    /// The tensors' names, in file order.
    pub fn names(&self) -> Vec<&str> {
        self.files.iter().map(|f| f.name.as_str()).collect()
    }

    /// (dtype, shape) of tensor `name` as the manifest records it (before reading its bytes).
    pub fn info(&self, name: &str) -> Result<(DType, &[usize])> {
        self.entry(name).map(|f| (f.dtype, f.shape.as_slice()))
    }

    /// Reads and verifies tensor `name`.
    pub fn read(&self, name: &str) -> Result<LoadedTensor> {
        let f = self.entry(name)?;
        Ok(LoadedTensor { name: f.name.clone(), dtype: f.dtype, shape: f.shape.clone(), data: read_verified(&self.path, f)? })
    }

    fn entry(&self, name: &str) -> Result<&FileEntry> {
        self.files.iter().find(|f| f.name == name).ok_or_else(|| Error::file(&self.path, format!("checkpoint has no tensor `{name}`")))
    }
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
