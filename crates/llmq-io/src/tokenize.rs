//! `llmq tokenize`: text -> token files (version 2) with a Hugging Face `tokenizer.json`.
//!
//! Inputs: `.txt` files (each file is one document), `.jsonl` files (one JSON object per line,
//! the document is the string in field `field`; blank lines are skipped) and `.parquet` files
//! (one document per row, in column `field`; see [`crate::parquet_input`]). Every non-empty
//! document is encoded and followed by the EOS id. With `chat`, a document is a conversation
//! (field `field` holds its messages), rendered with the model's chat template and written with a
//! loss mask that trains the assistant's replies only ([`crate::chat`]); the EOS after it is not
//! trained. Output files `{prefix}_000.bin`,
//! `{prefix}_001.bin`, ... hold at most `max_tokens_per_file` tokens each; a file is cut exactly
//! at that count (a document may continue in the next file, just as chunk boundaries cut
//! documents during training). The header's vocab size is the tokenizer's size including added
//! tokens, so every id written is below it.
//!
//! EOS id, in order of preference: `eos_id`; an end-of-document token `<|endoftext|>` or
//! `<|end_of_text|>` (a chat model's `eos_token` ends a turn, e.g. Qwen's `<|im_end|>`, and is
//! the wrong separator for documents); the `eos_token` of `tokenizer_config.json` next to the
//! tokenizer; `eos_token_id` of `generation_config.json` / `config.json` there; a token named
//! `</s>`, `<eos>`, `[EOS]` or `<|eos|>`.

use crate::chat::{ChatTemplate, Rendered};
use crate::parquet_input::ParquetColumn;
use crate::tokfile::{TokenFileInfo, TokenFileWriter};
use llmq_core::{Error, Result};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use tokenizers::Tokenizer;

#[derive(Clone, Debug)]
pub struct TokenizeOptions {
    /// `.txt`, `.jsonl` and `.parquet` files.
    pub inputs: Vec<PathBuf>,
    /// A `tokenizer.json`, or a directory holding one.
    pub tokenizer: PathBuf,
    /// JSON field (Parquet column) holding the text, or with `chat` the messages.
    pub field: String,
    /// Inputs are conversations: render them with the chat template, mask all but the replies.
    pub chat: bool,
    pub eos_id: Option<u32>,
    /// Apply the tokenizer's post-processor (e.g. Llama's BOS), as `transformers` does by default.
    pub add_special_tokens: bool,
    pub out_dir: PathBuf,
    pub prefix: String,
    pub max_tokens_per_file: u64,
    /// Delete existing `{prefix}_NNN.bin` files in `out_dir` first; otherwise they are an error.
    pub overwrite: bool,
}

impl TokenizeOptions {
    pub fn new(inputs: Vec<PathBuf>, tokenizer: PathBuf, out_dir: PathBuf) -> TokenizeOptions {
        TokenizeOptions {
            inputs,
            tokenizer,
            field: "text".into(),
            chat: false,
            eos_id: None,
            add_special_tokens: true,
            out_dir,
            prefix: "out".into(),
            max_tokens_per_file: 100_000_000,
            overwrite: false,
        }
    }
}

#[derive(Clone, Debug)]
pub struct TokenizeReport {
    pub files: Vec<TokenFileInfo>,
    pub documents: u64,
    pub tokens: u64,
    pub vocab_size: u32,
    pub eos: EosChoice,
    /// With `chat`: the template's file and the number of trained (mask 1) tokens.
    pub chat: Option<(PathBuf, u64)>,
}

/// Where a tokenize run stands, passed to its progress callback after every batch of documents.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenizeProgress {
    /// Input bytes whose documents are written.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Tokens written so far (EOS tokens included).
    pub tokens: u64,
}

/// Finds `tokenizer.json` for a file or directory argument.
pub fn tokenizer_json_path(p: &Path) -> Result<PathBuf> {
    if p.is_dir() {
        let j = p.join("tokenizer.json");
        if j.is_file() {
            return Ok(j);
        }
        return Err(Error::file(p, "directory has no tokenizer.json"));
    }
    if p.is_file() {
        return Ok(p.to_path_buf());
    }
    Err(Error::file(p, "tokenizer not found (expected tokenizer.json or a directory holding it)"))
}

/// Loads a tokenizer with padding and truncation switched off (they would change the tokens).
pub fn load_tokenizer(path: &Path) -> Result<Tokenizer> {
    let j = tokenizer_json_path(path)?;
    let mut t = crate::guarded(|| Tokenizer::from_file(&j)).map_err(|e| Error::file(&j, format!("cannot load tokenizer: {e}")))?;
    t.with_padding(None);
    t.with_truncation(None).map_err(|e| Error::file(&j, format!("cannot disable truncation: {e}")))?;
    Ok(t)
}

/// The token appended after each document, and why it was chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EosChoice {
    pub id: u32,
    /// The token's string (None only for an explicit id the vocabulary has no string for).
    pub token: Option<String>,
    /// Where the choice came from, for the printed report.
    pub source: String,
}

/// Tokens that end a document in pre-training text (GPT-2/Qwen, Llama 3). They come before the
/// `eos_token` of `tokenizer_config.json`, which in chat models is the end of a turn
/// (`<|im_end|>`, `<|eot_id|>`), not of a document.
const DOCUMENT_END: &[&str] = &["<|endoftext|>", "<|end_of_text|>"];

/// The directory of a tokenizer.json path ("." for a bare file name, whose parent is "", which
/// would print as nothing in messages).
pub fn tokenizer_dir(json: &Path) -> &Path {
    json.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// The EOS token per the module docs; `dir` is the directory of tokenizer.json.
pub fn find_eos(tok: &Tokenizer, dir: &Path) -> Result<EosChoice> {
    let found = |id: u32, source: String| EosChoice { id, token: tok.id_to_token(id), source };
    for n in DOCUMENT_END {
        if let Some(id) = tok.token_to_id(n) {
            return Ok(found(id, "the tokenizer's end-of-document token".into()));
        }
    }
    let read = |f: &str| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(dir.join(f)).ok()?).ok()
    };
    if let Some(c) = read("tokenizer_config.json") {
        let name = match c.get("eos_token") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(o) => o.get("content").and_then(|x| x.as_str()).map(String::from),
            None => None,
        };
        if let Some(id) = name.and_then(|n| tok.token_to_id(&n)) {
            return Ok(found(id, "eos_token of tokenizer_config.json".into()));
        }
    }
    for f in ["generation_config.json", "config.json"] {
        if let Some(c) = read(f) {
            let id = match c.get("eos_token_id") {
                Some(serde_json::Value::Array(a)) => a.first().and_then(|x| x.as_u64()),
                Some(x) => x.as_u64(),
                None => None,
            };
            if let Some(id) = id.and_then(|i| u32::try_from(i).ok()) {
                return Ok(found(id, format!("eos_token_id of {f}")));
            }
        }
    }
    for n in ["</s>", "<eos>", "[EOS]", "<|eos|>"] {
        if let Some(id) = tok.token_to_id(n) {
            return Ok(found(id, "a token named like an end of sequence".into()));
        }
    }
    Err(Error::Config(format!(
        "cannot tell the EOS token of {}: pass the EOS id explicitly (--eos-id)",
        dir.join("tokenizer.json").display()
    )))
}

/// Writes a token stream (with its loss mask, in chat mode) into size-limited files.
struct SplitWriter<'a> {
    opts: &'a TokenizeOptions,
    vocab: u32,
    cur: Option<TokenFileWriter>,
    done: Vec<TokenFileInfo>,
}

impl SplitWriter<'_> {
    fn path(&self, i: usize) -> PathBuf {
        self.opts.out_dir.join(format!("{}_{i:03}.bin", self.opts.prefix))
    }
    fn push(&mut self, mut toks: &[i32], mut mask: Option<&[bool]>) -> Result<()> {
        while !toks.is_empty() {
            if self.cur.is_none() {
                let p = self.path(self.done.len());
                self.cur = Some(TokenFileWriter::create(&p, Some(self.vocab), self.opts.chat)?);
            }
            let w = self.cur.as_mut().unwrap();
            let room = (self.opts.max_tokens_per_file - w.n_tokens()) as usize;
            let n = room.min(toks.len());
            w.push(&toks[..n], mask.map(|m| &m[..n]))?;
            toks = &toks[n..];
            mask = mask.map(|m| &m[n..]);
            if w.n_tokens() >= self.opts.max_tokens_per_file {
                self.done.push(self.cur.take().unwrap().finish()?);
            }
        }
        Ok(())
    }
    fn finish(mut self) -> Result<Vec<TokenFileInfo>> {
        if let Some(w) = self.cur.take() {
            if w.n_tokens() > 0 {
                self.done.push(w.finish()?);
            }
        }
        Ok(self.done)
    }
}

fn existing_outputs(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = n.strip_prefix(&format!("{prefix}_")).and_then(|r| r.strip_suffix(".bin")) {
                if !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()) {
                    v.push(e.path());
                }
            }
        }
    }
    v.sort();
    v
}

/// Documents encoded together (in parallel by the tokenizer): enough for its threads, small
/// enough that progress is reported every fraction of a second.
const BATCH_DOCS: usize = 2048;
pub const BATCH_BYTES: usize = 1 << 20;

const EXTENSIONS: &[&str] = &["txt", "jsonl", "parquet"];

/// Collects documents into batches, encodes them and writes their tokens.
struct Batcher<'a> {
    opts: &'a TokenizeOptions,
    tok: &'a Tokenizer,
    tj: &'a Path,
    vocab: u32,
    eos: u32,
    chat: Option<ChatTemplate>,
    out: SplitWriter<'a>,
    docs: Vec<Rendered>,
    doc_bytes: usize,
    /// Input bytes read whose documents are not written yet, and those that are.
    pending_bytes: u64,
    done_bytes: u64,
    total_bytes: u64,
    n_docs: u64,
    n_tokens: u64,
    n_trained: u64,
    progress: &'a mut dyn FnMut(TokenizeProgress),
}

impl Batcher<'_> {
    /// Adds the document in `v` (the value of the field; `at` says where it is in `input`).
    fn add_value(&mut self, input: &Path, at: &str, v: Option<&serde_json::Value>) -> Result<()> {
        let field = &self.opts.field;
        let doc = match &self.chat {
            Some(c) => c.render_conversation(input, at, field, v)?,
            None => match v {
                Some(serde_json::Value::String(s)) if s.is_empty() => return Ok(()),
                Some(serde_json::Value::String(s)) => Rendered { text: s.clone(), spans: Vec::new() },
                Some(other) => return Err(Error::file(input, format!("{at}: field `{field}` is not a string: {other}"))),
                None => return Err(Error::file(input, format!("{at}: no field `{field}`"))),
            },
        };
        self.add(doc)
    }

    fn add(&mut self, doc: Rendered) -> Result<()> {
        self.doc_bytes += doc.text.len();
        self.docs.push(doc);
        if self.docs.len() >= BATCH_DOCS || self.doc_bytes >= BATCH_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.docs.is_empty() {
            let texts: Vec<&str> = self.docs.iter().map(|d| d.text.as_str()).collect();
            // a rendered conversation holds its special tokens already
            let specials = self.opts.add_special_tokens && self.chat.is_none();
            let encs =
                crate::guarded(|| self.tok.encode_batch(texts, specials)).map_err(|e| Error::file(self.tj, format!("tokenizer failed: {e}")))?;
            let mut buf: Vec<i32> = Vec::new();
            for (enc, doc) in encs.iter().zip(&self.docs) {
                buf.clear();
                for &id in enc.get_ids() {
                    if id >= self.vocab {
                        let m = format!("tokenizer produced id {id} outside its vocabulary of {}", self.vocab);
                        return Err(Error::file(self.tj, m));
                    }
                    buf.push(id as i32);
                }
                buf.push(self.eos as i32);
                let mask = self.chat.as_ref().map(|c| {
                    let mut m = c.loss_mask(enc, doc);
                    m.push(false);
                    m
                });
                self.n_trained += mask.iter().flatten().filter(|&&b| b).count() as u64;
                self.n_tokens += buf.len() as u64;
                self.n_docs += 1;
                self.out.push(&buf, mask.as_deref())?;
            }
            self.docs.clear();
            self.doc_bytes = 0;
        }
        self.done_bytes += self.pending_bytes;
        self.pending_bytes = 0;
        (self.progress)(TokenizeProgress { bytes_done: self.done_bytes, bytes_total: self.total_bytes, tokens: self.n_tokens });
        Ok(())
    }

    fn read_jsonl(&mut self, p: &Path) -> Result<()> {
        let f = std::fs::File::open(p).map_err(|e| Error::file(p, format!("cannot open: {e}")))?;
        let mut r = std::io::BufReader::with_capacity(1 << 20, f);
        let mut line = String::new();
        let mut lineno = 0u64;
        loop {
            line.clear();
            let n = r.read_line(&mut line).map_err(|e| Error::file(p, format!("line {}: cannot read: {e}", lineno + 1)))?;
            if n == 0 {
                return Ok(());
            }
            lineno += 1;
            self.pending_bytes += n as u64;
            let l = line.trim();
            if l.is_empty() {
                continue;
            }
            let v: serde_json::Value =
                serde_json::from_str(l).map_err(|e| Error::file(p, format!("line {lineno}: not valid JSON: {e}")))?;
            self.add_value(p, &format!("line {lineno}"), v.get(&self.opts.field))?;
        }
    }

    fn read_parquet(&mut self, p: &Path, file_bytes: u64) -> Result<()> {
        let col = ParquetColumn::open(p, &self.opts.field)?;
        let (mut row, mut counted) = (0u64, 0u64);
        for g in 0..col.row_groups() {
            row += col.read_row_group(g, row, &mut |r, v| self.add_value(p, &format!("row {r}"), Some(&v)))?;
            let b = col.row_group_bytes(g).min(file_bytes - counted);
            counted += b;
            self.pending_bytes += b;
        }
        self.pending_bytes += file_bytes - counted;
        Ok(())
    }
}

/// Tokenizes `opts.inputs` into token files; `progress` is called at the start and after every
/// batch of documents (about [`BATCH_BYTES`] of text, so that a bar moves steadily).
pub fn tokenize(opts: &TokenizeOptions, progress: &mut dyn FnMut(TokenizeProgress)) -> Result<TokenizeReport> {
    if opts.inputs.is_empty() {
        return Err(Error::Config("tokenize: no input files".into()));
    }
    if opts.max_tokens_per_file == 0 || opts.max_tokens_per_file > i32::MAX as u64 {
        return Err(Error::Config(format!(
            "tokenize: tokens per file must be in 1..={}, got {}",
            i32::MAX,
            opts.max_tokens_per_file
        )));
    }
    let mut sizes = Vec::new();
    for p in &opts.inputs {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        if !EXTENSIONS.contains(&ext) {
            return Err(Error::file(p, "unsupported input: expected a .txt, .jsonl or .parquet file"));
        }
        if opts.chat && ext == "txt" {
            return Err(Error::file(p, "--chat reads conversations from .jsonl or .parquet files, not .txt"));
        }
        sizes.push(std::fs::metadata(p).map_err(|e| Error::file(p, format!("cannot read input: {e}")))?.len());
    }
    let tj = tokenizer_json_path(&opts.tokenizer)?;
    let tok = load_tokenizer(&tj)?;
    let vocab = tok.get_vocab_size(true);
    if vocab == 0 || vocab > i32::MAX as usize {
        return Err(Error::file(&tj, format!("tokenizer vocabulary size {vocab} is not usable")));
    }
    let vocab = vocab as u32;
    let dir = tokenizer_dir(&tj);
    let eos = match opts.eos_id {
        Some(id) => EosChoice { id, token: tok.id_to_token(id), source: "--eos-id".into() },
        None => find_eos(&tok, dir)?,
    };
    if eos.id >= vocab {
        return Err(Error::Config(format!("EOS id {} is outside the tokenizer's vocabulary of {vocab}", eos.id)));
    }
    let chat = if opts.chat { Some(ChatTemplate::load(dir, &tok)?) } else { None };
    std::fs::create_dir_all(&opts.out_dir).map_err(|e| Error::file(&opts.out_dir, format!("cannot create: {e}")))?;
    let old = existing_outputs(&opts.out_dir, &opts.prefix);
    if !old.is_empty() {
        if !opts.overwrite {
            return Err(Error::file(
                &old[0],
                format!("output exists ({} file(s) named {}_NNN.bin); remove them or pass --overwrite", old.len(), opts.prefix),
            ));
        }
        for p in old {
            std::fs::remove_file(&p).map_err(|e| Error::file(&p, format!("cannot remove: {e}")))?;
        }
    }

    let total_bytes = sizes.iter().sum();
    progress(TokenizeProgress { bytes_done: 0, bytes_total: total_bytes, tokens: 0 });
    let mut b = Batcher {
        opts,
        tok: &tok,
        tj: &tj,
        vocab,
        eos: eos.id,
        chat,
        out: SplitWriter { opts, vocab, cur: None, done: Vec::new() },
        docs: Vec::new(),
        doc_bytes: 0,
        pending_bytes: 0,
        done_bytes: 0,
        total_bytes,
        n_docs: 0,
        n_tokens: 0,
        n_trained: 0,
        progress,
    };
    for (p, &size) in opts.inputs.iter().zip(&sizes) {
        match p.extension().and_then(|e| e.to_str()) {
            Some("txt") => {
                let text = std::fs::read_to_string(p).map_err(|e| Error::file(p, format!("cannot read as UTF-8 text: {e}")))?;
                b.pending_bytes += text.len() as u64;
                if !text.is_empty() {
                    b.add(Rendered { text, spans: Vec::new() })?;
                }
            }
            Some("jsonl") => b.read_jsonl(p)?,
            _ => b.read_parquet(p, size)?,
        }
    }
    b.flush()?;
    let (n_docs, n_tokens, n_trained) = (b.n_docs, b.n_tokens, b.n_trained);
    let template = b.chat.as_ref().map(|c| c.source.clone());
    let files = b.out.finish()?;
    if files.is_empty() {
        return Err(Error::Config("tokenize: the inputs hold no text; nothing written".into()));
    }
    Ok(TokenizeReport { files, documents: n_docs, tokens: n_tokens, vocab_size: vocab, eos, chat: template.map(|t| (t, n_trained)) })
}
