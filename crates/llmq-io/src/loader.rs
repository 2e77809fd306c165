//! `TokenLoader`: batches of training (or eval) sequences from token files.
//!
//! Chunking: a file of n tokens holds `(n - 1) / T` chunks; chunk k has inputs
//! `tokens[kT .. kT + T]` and targets `tokens[kT + 1 .. kT + T + 1]` (chunks never cross files; the
//! last partial chunk is dropped). A 0 bit in the file's loss mask at a target's position turns
//! that target into -100.
//!
//! Order: each epoch has a permutation of all chunks: the files in a shuffled order, and within
//! each file its chunks in a shuffled order (reading stays local to one file at a time). Both
//! shuffles are seeded by (seed, epoch[, file]) through the self-contained [`Rng`] below, so the
//! order never depends on a crate version. With `shuffle = false` (eval) the files keep the given
//! order and chunks are in file order.
//!
//! Ranks: with world size W, rank r takes positions r, r + W, r + 2W, ... of the epoch's
//! permutation, `total_chunks / W` chunks per epoch (the `total_chunks % W` chunks at the end of
//! each epoch's permutation are skipped, so every rank finishes an epoch at the same batch). A
//! batch takes the next B chunks; an exhausted epoch continues into the next epoch's permutation.
//!
//! Resume: [`BatchSource::state`] records the seed, epoch, index into this rank's share of the
//! permutation, T, W and every file's name, token count and size. Since the position is a pure
//! function of these, a restored loader continues exactly, whatever file the position is in. All
//! ranks advance in lock step, so the state saved by any rank restores every rank, under another
//! number of ranks too (index i of W ranks is position i·W of the epoch's permutation; the chunks
//! skipped at an epoch's end, `total_chunks % W`, depend on W, so later epochs differ from those
//! of an uninterrupted run under the old number of ranks).

use crate::data::{Batch, BatchSource};
use crate::tokfile::{check_tokens, TokenFileInfo, TokenFileReader};
use llmq_core::{Error, Result};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// A small seeded PRNG: splitmix64 for seeding and hashing, xoshiro256** for streams.
// ---------------------------------------------------------------------------------------------

/// One step of splitmix64: advances `state` and returns a well-mixed 64-bit value.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hashes two values into a seed.
pub fn mix_seed(a: u64, b: u64) -> u64 {
    let mut s = a ^ b.wrapping_mul(0xD6E8_FEB8_6659_FD93).rotate_left(17);
    splitmix64(&mut s) ^ splitmix64(&mut s).rotate_left(32)
}

/// xoshiro256** seeded through splitmix64.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut x = seed;
        Rng { s: [splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x), splitmix64(&mut x)] }
    }
    pub fn next_u64(&mut self) -> u64 {
        let r = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        r
    }
    /// Uniform in `0..n` (n > 0), unbiased (Lemire's multiply-shift with rejection).
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        let threshold = n.wrapping_neg() % n;
        loop {
            let m = (self.next_u64() as u128) * (n as u128);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The loader
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoaderOptions {
    /// T: tokens per sequence.
    pub seq_len: usize,
    pub seed: u64,
    pub rank: usize,
    pub world_size: usize,
    /// Shuffle files and chunks per epoch (training); false for eval.
    pub shuffle: bool,
    /// Resume even when a file's content fingerprint (or size) differs from the one saved: a
    /// deliberate change of the data under the same names.
    pub allow_data_change: bool,
    /// The model's vocabulary size: token ids must be below it (checked as chunks are read, and
    /// up front by [`TokenLoader::check_all_tokens`]).
    pub vocab_limit: Option<usize>,
}

impl LoaderOptions {
    pub fn train(seq_len: usize, seed: u64) -> LoaderOptions {
        LoaderOptions { seq_len, seed, rank: 0, world_size: 1, shuffle: true, vocab_limit: None, allow_data_change: false }
    }
    pub fn eval(seq_len: usize) -> LoaderOptions {
        LoaderOptions { seq_len, seed: 0, rank: 0, world_size: 1, shuffle: false, vocab_limit: None, allow_data_change: false }
    }
}

struct FileEntry {
    info: TokenFileInfo,
    chunks: u64,
    /// See [`crate::tokfile::fingerprint`]; recorded in the state and compared on restore.
    fingerprint: u64,
    reader: Option<TokenFileReader>,
}

pub struct TokenLoader {
    files: Vec<FileEntry>,
    opts: LoaderOptions,
    total_chunks: u64,
    per_rank: u64,
    epoch: u64,
    index: u64,
    // caches derived from (seed, epoch): the file order with chunk prefix sums, and one file's
    // chunk permutation
    order: Option<(u64, Vec<usize>, Vec<u64>)>,
    perm: Option<(u64, usize, Vec<u32>)>,
    buf_tokens: Vec<i32>,
    buf_mask: Vec<bool>,
}

/// Files matching a glob pattern (several patterns may be separated by commas), sorted.
pub fn expand_glob(pattern: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for pat in pattern.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let paths = glob::glob(pat).map_err(|e| Error::Config(format!("bad file pattern {pat:?}: {e}")))?;
        let mut v = Vec::new();
        for p in paths {
            let p = p.map_err(|e| Error::file(e.path(), format!("cannot read while matching {pat:?}: {}", e.error())))?;
            if p.is_file() {
                v.push(p);
            }
        }
        if v.is_empty() {
            return Err(Error::Config(format!("file pattern {pat:?} matches no files")));
        }
        v.sort();
        out.extend(v);
    }
    if out.is_empty() {
        return Err(Error::Config(format!("file pattern {pattern:?} names no files")));
    }
    Ok(out)
}

impl TokenLoader {
    /// A loader over `files` (in this order; the order matters for eval and for the state).
    pub fn new(files: &[PathBuf], opts: LoaderOptions) -> Result<TokenLoader> {
        if files.is_empty() {
            return Err(Error::Config("no token files given".into()));
        }
        if opts.seq_len == 0 {
            return Err(Error::Config("sequence length must be positive".into()));
        }
        if opts.world_size == 0 || opts.rank >= opts.world_size {
            return Err(Error::Config(format!("rank {} must be below world size {}", opts.rank, opts.world_size)));
        }
        let t = opts.seq_len as u64;
        let mut entries = Vec::with_capacity(files.len());
        let mut vocab: Option<(u32, &Path)> = None;
        for p in files {
            let reader = TokenFileReader::open(p)?;
            let info = reader.info().clone();
            if let Some(v) = info.vocab_size {
                match vocab {
                    Some((v0, p0)) if v0 != v => {
                        return Err(Error::file(
                            p,
                            format!("vocab_size {v} differs from {} in {} (files from different tokenizers?)", v0, p0.display()),
                        ))
                    }
                    None => vocab = Some((v, p)),
                    _ => {}
                }
            }
            let chunks = info.n_tokens.saturating_sub(1) / t;
            let fingerprint = crate::tokfile::fingerprint(p)?;
            entries.push(FileEntry { info, chunks, fingerprint, reader: None });
        }
        let total_chunks: u64 = entries.iter().map(|e| e.chunks).sum();
        let per_rank = total_chunks / opts.world_size as u64;
        Ok(TokenLoader {
            files: entries,
            total_chunks,
            per_rank,
            opts,
            epoch: 0,
            index: 0,
            order: None,
            perm: None,
            buf_tokens: Vec::new(),
            buf_mask: Vec::new(),
        })
    }

    /// Checks every token of every file against the vocabulary in one pass, so that a bad id is
    /// found before training rather than when its batch comes up; `progress(done, total)`.
    pub fn check_all_tokens(&self, progress: &mut dyn FnMut(u64, u64)) -> Result<()> {
        let total = self.total_tokens();
        let mut before = 0;
        for fe in &self.files {
            let limit = fe.info.token_limit(self.opts.vocab_limit);
            crate::tokfile::scan_tokens(&fe.info.path, limit, &mut |done| progress(before + done, total))?;
            before += fe.info.n_tokens;
        }
        Ok(())
    }

    /// A loader over the files matching `pattern` (see [`expand_glob`]).
    pub fn from_glob(pattern: &str, opts: LoaderOptions) -> Result<TokenLoader> {
        TokenLoader::new(&expand_glob(pattern)?, opts)
    }

    /// A deterministic, non-shuffled loader (eval): chunks in file order, rank-strided.
    pub fn eval(files: &[PathBuf], seq_len: usize, rank: usize, world_size: usize, vocab_limit: Option<usize>) -> Result<TokenLoader> {
        TokenLoader::new(files, LoaderOptions { seq_len, seed: 0, rank, world_size, shuffle: false, vocab_limit, allow_data_change: false })
    }

    /// Back to the first chunk of epoch 0.
    pub fn reset(&mut self) {
        self.epoch = 0;
        self.index = 0;
    }
    /// Chunks this rank takes per epoch.
    pub fn chunks_per_epoch(&self) -> u64 {
        self.per_rank
    }
    /// Chunks of all files together.
    pub fn total_chunks(&self) -> u64 {
        self.total_chunks
    }
    pub fn total_tokens(&self) -> u64 {
        self.files.iter().map(|f| f.info.n_tokens).sum()
    }
    pub fn files(&self) -> Vec<&TokenFileInfo> {
        self.files.iter().map(|f| &f.info).collect()
    }
    pub fn options(&self) -> &LoaderOptions {
        &self.opts
    }
    /// (epoch, index of the next chunk within this rank's share of the epoch).
    pub fn position(&self) -> (u64, u64) {
        (self.epoch, self.index)
    }
    /// Whole batches of `b` sequences left in the current epoch (for a full eval pass).
    pub fn batches_left_in_epoch(&self, b: usize) -> u64 {
        if b == 0 {
            return 0;
        }
        (self.per_rank - self.index) / b as u64
    }

    /// (file index, chunk index in that file) of global permutation position `g` of `epoch`.
    pub fn chunk_at(&mut self, epoch: u64, g: u64) -> (usize, u64) {
        debug_assert!(g < self.total_chunks);
        if self.order.as_ref().is_none_or(|(e, _, _)| *e != epoch) {
            let mut order: Vec<usize> = (0..self.files.len()).collect();
            if self.opts.shuffle {
                Rng::new(mix_seed(mix_seed(self.opts.seed, 0x6669_6C65_7321), epoch)).shuffle(&mut order);
            }
            let mut prefix = Vec::with_capacity(order.len() + 1);
            let mut acc = 0;
            prefix.push(0);
            for &f in &order {
                acc += self.files[f].chunks;
                prefix.push(acc);
            }
            self.order = Some((epoch, order, prefix));
        }
        let (_, order, prefix) = self.order.as_ref().unwrap();
        // the last k with prefix[k] <= g (files with no chunks have equal prefixes: skip them)
        let k = prefix.partition_point(|&p| p <= g) - 1;
        let file = order[k];
        let local = g - prefix[k];
        if !self.opts.shuffle {
            return (file, local);
        }
        if self.perm.as_ref().is_none_or(|(e, f, _)| *e != epoch || *f != file) {
            let mut p: Vec<u32> = (0..self.files[file].chunks as u32).collect();
            Rng::new(mix_seed(mix_seed(self.opts.seed, epoch), 0x4348_554E_4B00 + file as u64)).shuffle(&mut p);
            self.perm = Some((epoch, file, p));
        }
        let chunk = self.perm.as_ref().unwrap().2[local as usize] as u64;
        (file, chunk)
    }

    fn read_chunk(&mut self, file: usize, chunk: u64, inputs: &mut [i32], targets: &mut [i32]) -> Result<()> {
        let t = self.opts.seq_len;
        let start = chunk * t as u64;
        let fe = &mut self.files[file];
        if fe.reader.is_none() {
            let r = TokenFileReader::open(&fe.info.path)?;
            if r.info() != &fe.info {
                return Err(Error::file(&fe.info.path, "token file changed since the loader was created"));
            }
            fe.reader = Some(r);
        }
        let r = fe.reader.as_mut().unwrap();
        self.buf_tokens.resize(t + 1, 0);
        r.read_tokens(start, &mut self.buf_tokens)?;
        check_tokens(&fe.info.path, &self.buf_tokens, start, fe.info.token_limit(self.opts.vocab_limit))?;
        inputs.copy_from_slice(&self.buf_tokens[..t]);
        targets.copy_from_slice(&self.buf_tokens[1..]);
        if fe.info.has_masks {
            self.buf_mask.resize(t, true);
            r.read_mask(start + 1, &mut self.buf_mask)?;
            for (tg, &m) in targets.iter_mut().zip(&self.buf_mask) {
                if !m {
                    *tg = -100;
                }
            }
        }
        Ok(())
    }

    fn state_files(&self) -> serde_json::Value {
        self.files
            .iter()
            .map(|f| {
                serde_json::json!({
                    "name": file_name(&f.info.path),
                    "n_tokens": f.info.n_tokens,
                    "file_size": f.info.file_size,
                    "fingerprint": format!("{:016x}", f.fingerprint),
                })
            })
            .collect()
    }
}

fn file_name(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| p.display().to_string())
}

fn fmt_count(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, ch) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

impl BatchSource for TokenLoader {
    fn next_batch(&mut self, b: usize, t: usize) -> Result<Batch> {
        if t != self.opts.seq_len {
            return Err(Error::Config(format!(
                "token loader was built for sequences of {} tokens, asked for {t}",
                self.opts.seq_len
            )));
        }
        if b > 0 && self.per_rank == 0 {
            return Err(Error::Config(format!(
                "not enough data: {} tokens in {} file(s) give {} chunks of {} (+1) tokens, fewer than the world size {}",
                self.total_tokens(),
                self.files.len(),
                self.total_chunks,
                t,
                self.opts.world_size
            )));
        }
        let mut batch = Batch { inputs: vec![0; b * t], targets: vec![0; b * t] };
        for i in 0..b {
            if self.index >= self.per_rank {
                self.epoch += 1;
                self.index = 0;
            }
            let g = self.opts.rank as u64 + self.index * self.opts.world_size as u64;
            let (file, chunk) = self.chunk_at(self.epoch, g);
            let (inp, tgt) = (&mut batch.inputs[i * t..(i + 1) * t], &mut batch.targets[i * t..(i + 1) * t]);
            self.read_chunk(file, chunk, inp, tgt)?;
            self.index += 1;
        }
        Ok(batch)
    }

    fn state(&self) -> serde_json::Value {
        serde_json::json!({
            "kind": "token_loader",
            "format": 1,
            "seed": self.opts.seed,
            "epoch": self.epoch,
            "index": self.index,
            "seq_len": self.opts.seq_len,
            "world_size": self.opts.world_size,
            "shuffle": self.opts.shuffle,
            "files": self.state_files(),
        })
    }

    fn restore(&mut self, s: &serde_json::Value) -> Result<()> {
        let bad = |f: &str, m: String| Err(Error::Config(format!("data loader state, field `{f}`: {m}")));
        let u = |f: &str| -> Result<u64> {
            s.get(f)
                .and_then(|v| v.as_u64())
                .ok_or_else(|| Error::Config(format!("data loader state: missing or non-integer field `{f}`")))
        };
        if s.get("kind").and_then(|k| k.as_str()) != Some("token_loader") {
            return bad("kind", format!("expected \"token_loader\", got {}", s.get("kind").unwrap_or(&serde_json::Value::Null)));
        }
        if u("format")? != 1 {
            return bad("format", format!("unsupported format {}", u("format")?));
        }
        let seq_len = u("seq_len")?;
        if seq_len != self.opts.seq_len as u64 {
            return bad("seq_len", format!("saved with {seq_len}, this run uses {}", self.opts.seq_len));
        }
        let world = u("world_size")?;
        if world == 0 {
            return bad("world_size", "0".into());
        }
        let shuffle = s.get("shuffle").and_then(|v| v.as_bool());
        if shuffle != Some(self.opts.shuffle) {
            return bad("shuffle", format!("saved {shuffle:?}, this loader has {}", self.opts.shuffle));
        }
        let files = match s.get("files").and_then(|f| f.as_array()) {
            Some(f) => f,
            None => return bad("files", "missing".into()),
        };
        if files.len() != self.files.len() {
            return bad("files", format!("saved with {} files, now {}", files.len(), self.files.len()));
        }
        for (i, (sf, f)) in files.iter().zip(&self.files).enumerate() {
            let name = file_name(&f.info.path);
            if sf.get("name").and_then(|n| n.as_str()) != Some(name.as_str()) {
                return bad("files", format!("file {i} was {}, now {name}", sf.get("name").unwrap_or(&serde_json::Value::Null)));
            }
            if self.opts.allow_data_change {
                continue;
            }
            for (k, v) in [("n_tokens", f.info.n_tokens), ("file_size", f.info.file_size)] {
                let saved = sf.get(k).and_then(|x| x.as_u64());
                if saved != Some(v) {
                    return bad("files", format!("{name}: {k} was {saved:?} when saved, now {v} (file changed; --allow-data-change to resume anyway)"));
                }
            }
            let saved = sf.get("fingerprint").and_then(|x| x.as_str());
            let now = format!("{:016x}", f.fingerprint);
            if saved != Some(now.as_str()) {
                return bad(
                    "files",
                    format!(
                        "{}: content fingerprint was {saved:?} when saved, now {now:?}: a different file of the same name and size (--allow-data-change to resume anyway)",
                        f.info.path.display()
                    ),
                );
            }
        }
        let (seed, epoch, mut index) = (u("seed")?, u("epoch")?, u("index")?);
        if world != self.opts.world_size as u64 {
            // ranks advance in lock step: index i of W ranks is position i·W of the epoch's
            // permutation, which W' ranks continue from at index i·W / W'
            let pos = index.saturating_mul(world);
            let now = self.opts.world_size as u64;
            if !pos.is_multiple_of(now) {
                return bad("world_size", format!("saved with {world} ranks at chunk {pos} of the epoch, which {now} ranks cannot continue from exactly (not a multiple of {now})"));
            }
            index = pos / now;
        }
        if index > self.per_rank {
            return bad("index", format!("{index} is past the {} chunks of an epoch", self.per_rank));
        }
        self.opts.seed = seed;
        self.epoch = epoch;
        self.index = index;
        self.order = None;
        self.perm = None;
        Ok(())
    }

    fn epoch(&self) -> f64 {
        if self.per_rank == 0 {
            return self.epoch as f64;
        }
        self.epoch as f64 + self.index as f64 / self.per_rank as f64
    }

    fn describe(&self) -> String {
        let mut list: Vec<String> = self
            .files
            .iter()
            .take(8)
            .map(|f| format!("{} ({} tokens{})", f.info.path.display(), fmt_count(f.info.n_tokens), if f.info.has_masks { ", masked" } else { "" }))
            .collect();
        if self.files.len() > 8 {
            list.push(format!("... {} more", self.files.len() - 8));
        }
        format!(
            "{} token file(s), {} tokens, {} chunks of {} tokens; rank {}/{} takes {} per epoch; {}: {}",
            self.files.len(),
            fmt_count(self.total_tokens()),
            fmt_count(self.total_chunks),
            self.opts.seq_len,
            self.opts.rank,
            self.opts.world_size,
            fmt_count(self.per_rank),
            if self.opts.shuffle { format!("shuffled with seed {}", self.opts.seed) } else { "in order".into() },
            list.join(", ")
        )
    }
}
