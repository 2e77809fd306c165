//! Token files, the format of the reference system (REFERENCE.md "Token files").
//!
//! Exact layout (all integers little-endian int32):
//!
//! | bytes      | field           | notes                                                      |
//! |------------|-----------------|------------------------------------------------------------|
//! | 0..8       | magic           | `"BIN.TOK\n"`                                              |
//! | 8..12      | version         | 1 or 2                                                     |
//! | 12..16     | bytes_per_token | must be 4                                                  |
//! | 16..20     | n_tokens        | 0 ..= i32::MAX                                             |
//! | 20..24     | vocab_size      | version 2: > 0; version 1: ignored (reported as unknown)   |
//! | 24..28     | has_masks       | version 2: 0 or 1; version 1: 1 means masks, else none     |
//! | 28..1024   | unused          | written as zeros; ignored when reading                     |
//! | 1024..     | tokens          | n_tokens int32                                             |
//! | then       | loss mask       | if has_masks: ceil(n_tokens / 8) bytes, bit i of the file  |
//! |            |                 | is bit (i % 8) of byte i / 8 (LSB first); 0 = ignore the   |
//! |            |                 | target at token position i                                 |
//!
//! The file size must equal the size these fields imply exactly; a reader checks that before it
//! allocates anything sized by `n_tokens`. (Version 1 files written by older tools may hold
//! padding bytes instead of a `has_masks` value; only the value 1 turns masks on there.)
//!
//! Files written by the reference's Python script record the tokenizer's *base* vocabulary size
//! (without added tokens), so their EOS id can equal `vocab_size`. Token ids are therefore checked
//! against the model's vocabulary when the caller knows it (`vocab_limit`), and against the
//! header's `vocab_size` only otherwise.

use llmq_core::{Error, Result};
use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 8] = b"BIN.TOK\n";
pub const HEADER_BYTES: u64 = 1024;

/// A validated token-file header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenFileInfo {
    pub path: PathBuf,
    pub version: i32,
    pub n_tokens: u64,
    /// Version 2 only.
    pub vocab_size: Option<u32>,
    pub has_masks: bool,
    /// File size in bytes (equal to [`TokenFileInfo::expected_size`]).
    pub file_size: u64,
}

impl TokenFileInfo {
    pub fn mask_bytes(&self) -> u64 {
        if self.has_masks {
            self.n_tokens.div_ceil(8)
        } else {
            0
        }
    }
    pub fn mask_offset(&self) -> u64 {
        HEADER_BYTES + 4 * self.n_tokens
    }
    pub fn expected_size(&self) -> u64 {
        self.mask_offset() + self.mask_bytes()
    }
    /// The bound token ids must stay below: `vocab_limit` if given, else the header's vocab size.
    pub fn token_limit(&self, vocab_limit: Option<usize>) -> Option<u64> {
        vocab_limit.map(|v| v as u64).or(self.vocab_size.map(|v| v as u64))
    }
}

fn field_i32(h: &[u8], off: usize) -> i32 {
    i32::from_le_bytes([h[off], h[off + 1], h[off + 2], h[off + 3]])
}

/// Parses and validates a header against the file size (the file is not read further).
pub fn parse_header(path: &Path, header: &[u8], file_size: u64) -> Result<TokenFileInfo> {
    let err = |m: String| Error::file(path, m);
    if header.len() < HEADER_BYTES as usize || file_size < HEADER_BYTES {
        return Err(err(format!(
            "truncated token file: {file_size} bytes, the header alone is {HEADER_BYTES} bytes"
        )));
    }
    if &header[0..8] != MAGIC {
        return Err(err(format!(
            "not a token file: magic (bytes 0..8) is {:?}, expected {:?}",
            String::from_utf8_lossy(&header[0..8]),
            "BIN.TOK\\n"
        )));
    }
    let version = field_i32(header, 8);
    if version != 1 && version != 2 {
        return Err(err(format!("field `version` (bytes 8..12): unsupported version {version}, expected 1 or 2")));
    }
    let bpt = field_i32(header, 12);
    if bpt != 4 {
        return Err(err(format!("field `bytes_per_token` (bytes 12..16): expected 4, got {bpt}")));
    }
    let n = field_i32(header, 16);
    if n < 0 {
        return Err(err(format!("field `n_tokens` (bytes 16..20): negative value {n}")));
    }
    let vocab_raw = field_i32(header, 20);
    let masks_raw = field_i32(header, 24);
    let (vocab_size, has_masks) = if version == 2 {
        if vocab_raw <= 0 {
            return Err(err(format!("field `vocab_size` (bytes 20..24): expected a positive value, got {vocab_raw}")));
        }
        if masks_raw != 0 && masks_raw != 1 {
            return Err(err(format!("field `has_masks` (bytes 24..28): expected 0 or 1, got {masks_raw}")));
        }
        (Some(vocab_raw as u32), masks_raw == 1)
    } else {
        (None, masks_raw == 1)
    };
    let info = TokenFileInfo { path: path.to_path_buf(), version, n_tokens: n as u64, vocab_size, has_masks, file_size };
    let want = info.expected_size();
    if file_size != want {
        let what = if file_size < want { "truncated body" } else { "trailing bytes after the body" };
        return Err(err(format!(
            "{what}: header says n_tokens = {n}{} so the file must be {want} bytes, it is {file_size}",
            if has_masks { " with a loss mask" } else { "" }
        )));
    }
    Ok(info)
}

/// Reads and validates the header of `path`.
pub fn read_header(path: &Path) -> Result<TokenFileInfo> {
    let (_, info) = open_checked(path)?;
    Ok(info)
}

fn open_checked(path: &Path) -> Result<(File, TokenFileInfo)> {
    let mut f = File::open(path).map_err(|e| Error::file(path, format!("cannot open token file: {e}")))?;
    let size = f.metadata().map_err(|e| Error::file(path, format!("cannot stat: {e}")))?.len();
    let mut h = vec![0u8; HEADER_BYTES as usize];
    if size >= HEADER_BYTES {
        f.read_exact(&mut h).map_err(|e| Error::file(path, format!("cannot read header: {e}")))?;
    }
    let info = parse_header(path, &h, size)?;
    Ok((f, info))
}

/// Checks that every token is in `0..limit`; `first` is the file position of `tokens[0]`.
pub fn check_tokens(path: &Path, tokens: &[i32], first: u64, limit: Option<u64>) -> Result<()> {
    for (i, &t) in tokens.iter().enumerate() {
        let bad = t < 0 || limit.is_some_and(|l| t as u64 >= l);
        if bad {
            return Err(Error::file(
                path,
                format!(
                    "token {} (position {}): id {t} outside the vocabulary 0..{}",
                    first + i as u64,
                    first + i as u64,
                    limit.map(|l| l.to_string()).unwrap_or_else(|| "2^31".into())
                ),
            ));
        }
    }
    Ok(())
}

/// Checks every token id of the file at `path` against `limit` in one sequential pass, calling
/// `progress` with the number of tokens checked so far.
pub fn scan_tokens(path: &Path, limit: Option<u64>, progress: &mut dyn FnMut(u64)) -> Result<()> {
    for_each_chunk(path, &mut |start, toks| {
        check_tokens(path, toks, start, limit)?;
        progress(start + toks.len() as u64);
        Ok(())
    })
}

/// The largest token id of the file at `path` (None for a file without tokens), in one
/// sequential pass; a negative id is an error naming its position.
pub fn max_token(path: &Path) -> Result<Option<u32>> {
    let mut max: Option<u32> = None;
    for_each_chunk(path, &mut |start, toks| {
        check_tokens(path, toks, start, None)?;
        let m = toks.iter().copied().max().map(|t| t as u32);
        max = max.max(m);
        Ok(())
    })?;
    Ok(max)
}

/// Calls `f(first position, tokens)` over the tokens of `path` in chunks of 4 Mi tokens.
fn for_each_chunk(path: &Path, f: &mut dyn FnMut(u64, &[i32]) -> Result<()>) -> Result<()> {
    const CHUNK: u64 = 1 << 22;
    let mut r = TokenFileReader::open(path)?;
    let n = r.info.n_tokens;
    let mut buf = vec![0i32; CHUNK.min(n) as usize];
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start) as usize;
        r.read_tokens(start, &mut buf[..len])?;
        f(start, &buf[..len])?;
        start += len as u64;
    }
    Ok(())
}

/// Blocks hashed by [`fingerprint`], and their size: 4 MiB read per file however large it is.
const FINGERPRINT_BLOCKS: u64 = 64;
const FINGERPRINT_BLOCK: u64 = 64 << 10;

/// A content fingerprint of a token file: XXH64 over its size and 64 blocks of 64 KiB spread
/// evenly from the header to the end (the whole file when smaller). Cheap for a 100 GB file;
/// a different file of the same name and size differs with near certainty unless the two agree
/// on every sampled block.
pub fn fingerprint(path: &Path) -> Result<u64> {
    let mut f = File::open(path).map_err(|e| Error::file(path, format!("cannot open token file: {e}")))?;
    let size = f.metadata().map_err(|e| Error::file(path, format!("cannot stat: {e}")))?.len();
    let mut h = crate::xxh64::Xxh64::new(0);
    h.update(&size.to_le_bytes());
    let mut buf = vec![0u8; FINGERPRINT_BLOCK as usize];
    let mut read = |off: u64, len: u64, h: &mut crate::xxh64::Xxh64| -> Result<()> {
        let b = &mut buf[..len as usize];
        f.seek(SeekFrom::Start(off))
            .and_then(|_| f.read_exact(b))
            .map_err(|e| Error::file(path, format!("cannot read {len} bytes at offset {off} for the fingerprint: {e}")))?;
        h.update(b);
        Ok(())
    };
    if size <= FINGERPRINT_BLOCKS * FINGERPRINT_BLOCK {
        let mut off = 0;
        while off < size {
            let len = FINGERPRINT_BLOCK.min(size - off);
            read(off, len, &mut h)?;
            off += len;
        }
    } else {
        let stride = (size - FINGERPRINT_BLOCK) / (FINGERPRINT_BLOCKS - 1);
        for i in 0..FINGERPRINT_BLOCKS {
            read(i * stride, FINGERPRINT_BLOCK, &mut h)?;
        }
    }
    Ok(h.digest())
}

/// Random access to one validated token file.
pub struct TokenFileReader {
    file: File,
    info: TokenFileInfo,
}

impl TokenFileReader {
    pub fn open(path: &Path) -> Result<TokenFileReader> {
        let (file, info) = open_checked(path)?;
        Ok(TokenFileReader { file, info })
    }
    pub fn info(&self) -> &TokenFileInfo {
        &self.info
    }

    /// Tokens `start .. start + out.len()`.
    pub fn read_tokens(&mut self, start: u64, out: &mut [i32]) -> Result<()> {
        let n = out.len() as u64;
        if start.checked_add(n).is_none_or(|e| e > self.info.n_tokens) {
            return Err(Error::file(
                &self.info.path,
                format!("read of tokens {start}..{} past n_tokens = {}", start.saturating_add(n), self.info.n_tokens),
            ));
        }
        let mut buf = vec![0u8; out.len() * 4];
        self.read_at(HEADER_BYTES + 4 * start, &mut buf)?;
        for (o, c) in out.iter_mut().zip(buf.chunks_exact(4)) {
            *o = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        Ok(())
    }

    /// Mask bits of positions `start .. start + out.len()` (all true without a mask).
    pub fn read_mask(&mut self, start: u64, out: &mut [bool]) -> Result<()> {
        let n = out.len() as u64;
        if start.checked_add(n).is_none_or(|e| e > self.info.n_tokens) {
            return Err(Error::file(
                &self.info.path,
                format!("read of mask bits {start}..{} past n_tokens = {}", start.saturating_add(n), self.info.n_tokens),
            ));
        }
        if !self.info.has_masks {
            out.fill(true);
            return Ok(());
        }
        if n == 0 {
            return Ok(());
        }
        let b0 = start / 8;
        let b1 = (start + n - 1) / 8;
        let mut buf = vec![0u8; (b1 - b0 + 1) as usize];
        self.read_at(self.info.mask_offset() + b0, &mut buf)?;
        for (i, o) in out.iter_mut().enumerate() {
            let bit = start + i as u64;
            *o = (buf[(bit / 8 - b0) as usize] >> (bit % 8)) & 1 == 1;
        }
        Ok(())
    }

    fn read_at(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        self.file.seek(SeekFrom::Start(off)).and_then(|_| self.file.read_exact(buf)).map_err(|e| {
            Error::file(
                &self.info.path,
                format!("cannot read {} bytes at offset {off} (file was {} bytes; changed since?): {e}", buf.len(), self.info.file_size),
            )
        })
    }
}

/// The whole content of a token file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenData {
    pub info: TokenFileInfo,
    pub tokens: Vec<i32>,
    /// One flag per token position (false = the target at that position is ignored).
    pub mask: Option<Vec<bool>>,
}

/// Reads and validates a whole token file; token ids are checked against `vocab_limit` (or the
/// header's vocab size, see the module docs).
pub fn read_token_file(path: &Path, vocab_limit: Option<usize>) -> Result<TokenData> {
    let mut r = TokenFileReader::open(path)?;
    let info = r.info.clone();
    let mut tokens = vec![0i32; info.n_tokens as usize];
    r.read_tokens(0, &mut tokens)?;
    check_tokens(path, &tokens, 0, info.token_limit(vocab_limit))?;
    let mask = if info.has_masks {
        let mut m = vec![false; tokens.len()];
        r.read_mask(0, &mut m)?;
        // The padding bits of the last byte must be zero.
        if info.n_tokens % 8 != 0 {
            let mut last = [0u8];
            r.read_at(info.mask_offset() + info.mask_bytes() - 1, &mut last)?;
            if last[0] >> (info.n_tokens % 8) != 0 {
                return Err(Error::file(path, "loss mask: padding bits after the last token are not zero"));
            }
        }
        Some(m)
    } else {
        None
    };
    Ok(TokenData { info, tokens, mask })
}

/// Streams tokens (and optionally mask flags) into a token file; the header is written by
/// `finish`, which then renames the temporary file into place.
pub struct TokenFileWriter {
    path: PathBuf,
    tmp: PathBuf,
    w: Option<BufWriter<File>>,
    version: i32,
    vocab_size: Option<u32>,
    has_masks: bool,
    n_tokens: u64,
    mask: Vec<u8>,
}

impl TokenFileWriter {
    /// Version 2 when `vocab_size` is given, version 1 otherwise.
    pub fn create(path: &Path, vocab_size: Option<u32>, has_masks: bool) -> Result<TokenFileWriter> {
        if let Some(v) = vocab_size {
            if v == 0 || v > i32::MAX as u32 {
                return Err(Error::file(path, format!("vocab_size {v} must be in 1..=2^31-1")));
            }
        }
        let tmp = crate::safetensors::tmp_name(path);
        let f = File::create(&tmp).map_err(|e| Error::file(&tmp, format!("cannot create: {e}")))?;
        let mut w = BufWriter::with_capacity(1 << 20, f);
        w.write_all(&[0u8; HEADER_BYTES as usize]).map_err(|e| Error::file(&tmp, format!("write failed: {e}")))?;
        Ok(TokenFileWriter {
            path: path.to_path_buf(),
            tmp,
            w: Some(w),
            version: if vocab_size.is_some() { 2 } else { 1 },
            vocab_size,
            has_masks,
            n_tokens: 0,
            mask: Vec::new(),
        })
    }

    pub fn n_tokens(&self) -> u64 {
        self.n_tokens
    }

    /// Appends tokens; `mask` (one flag per token) is required exactly when the file has masks.
    pub fn push(&mut self, tokens: &[i32], mask: Option<&[bool]>) -> Result<()> {
        let err = |m: String| Error::file(&self.path, m);
        match (self.has_masks, mask) {
            (true, None) => return Err(err("this file has loss masks: push needs a mask".into())),
            (false, Some(_)) => return Err(err("this file was created without loss masks".into())),
            (true, Some(m)) if m.len() != tokens.len() => {
                return Err(err(format!("mask has {} flags for {} tokens", m.len(), tokens.len())))
            }
            _ => {}
        }
        if self.n_tokens + tokens.len() as u64 > i32::MAX as u64 {
            return Err(err(format!("a token file holds at most {} tokens", i32::MAX)));
        }
        check_tokens(&self.path, tokens, self.n_tokens, self.vocab_size.map(|v| v as u64))?;
        if let Some(m) = mask {
            for (i, &b) in m.iter().enumerate() {
                let bit = self.n_tokens + i as u64;
                if bit.is_multiple_of(8) {
                    self.mask.push(0);
                }
                if b {
                    *self.mask.last_mut().unwrap() |= 1 << (bit % 8);
                }
            }
        }
        let mut buf = Vec::with_capacity(tokens.len() * 4);
        tokens.iter().for_each(|t| buf.extend_from_slice(&t.to_le_bytes()));
        let tmp = &self.tmp;
        self.w
            .as_mut()
            .expect("writer used after finish")
            .write_all(&buf)
            .map_err(|e| Error::file(tmp, format!("write failed: {e}")))?;
        self.n_tokens += tokens.len() as u64;
        Ok(())
    }

    /// Writes the mask and header, fsyncs and renames the file into place.
    pub fn finish(mut self) -> Result<TokenFileInfo> {
        let tmp = self.tmp.clone();
        let io = |e: std::io::Error| Error::file(&tmp, format!("write failed: {e}"));
        let mut w = self.w.take().unwrap();
        w.write_all(&self.mask).map_err(io)?;
        let mut f = w.into_inner().map_err(|e| io(e.into_error()))?;
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(MAGIC);
        for v in [
            self.version,
            4,
            self.n_tokens as i32,
            self.vocab_size.map(|v| v as i32).unwrap_or(0),
            self.has_masks as i32,
        ] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        f.seek(SeekFrom::Start(0)).map_err(io)?;
        f.write_all(&h).map_err(io)?;
        f.sync_all().map_err(io)?;
        drop(f);
        std::fs::rename(&self.tmp, &self.path)
            .map_err(|e| Error::file(&self.path, format!("cannot rename {} into place: {e}", self.tmp.display())))?;
        crate::safetensors::sync_parent(&self.path);
        read_header(&self.path)
    }
}

impl Drop for TokenFileWriter {
    fn drop(&mut self) {
        if self.w.is_some() {
            // not finished: remove the partial temporary file
            self.w = None;
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Writes a whole token file: version 2 with `vocab_size`, version 1 without.
pub fn write_token_file(path: &Path, tokens: &[i32], mask: Option<&[bool]>, vocab_size: Option<u32>) -> Result<TokenFileInfo> {
    let mut w = TokenFileWriter::create(path, vocab_size, mask.is_some())?;
    w.push(tokens, mask)?;
    w.finish()
}
