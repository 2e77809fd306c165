//! Hostile files: seeded random corruptions of valid token files, safetensors files, config.json,
//! checkpoints and Parquet files. Every read must return its value or an error naming the file:
//! never a panic, and never an allocation sized by a corrupted length field (each thread's
//! largest single allocation is recorded by the allocator below and checked against the file).

mod common;
use common::*;
use llmq_core::{DType, Error};
use llmq_io::ckpt::{self, Lineage, TensorRef};
use llmq_io::loader::splitmix64;
use llmq_io::safetensors::{write_safetensors, SafeTensorsFile, StDtype, TensorView};
use llmq_io::tokfile::{read_header, read_token_file, write_token_file};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::{Path, PathBuf};

/// The system allocator, recording the largest request of each thread.
struct Recording;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(l.size())));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: `p` came from `alloc` above with layout `l`.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let _ = LARGEST.try_with(|m| m.set(m.get().max(new)));
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Recording = Recording;

/// Cases per format: enough to reach every field of these small files many times over (20,000
/// per format ran clean once the library panics were guarded: `llmq_io::guarded`).
const CASES: u64 = 1000;

/// Values spliced over numbers and integer fields: the edges a length or offset check must hold.
const EDGES: [u64; 8] = [0, 1, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 1 << 40, i64::MAX as u64, u64::MAX];
const JSON_EDGES: [&str; 9] = ["0", "-1", "1e30", "18446744073709551616", "2147483648", "null", "\"x\"", "[]", "1.5"];

/// One to three corruptions of `bytes`: a flipped or replaced byte, an edge value written over
/// eight bytes, a truncation, trailing garbage, or a number of JSON text replaced by an edge
/// (in a file without digits, an inverted byte).
fn mutate(bytes: &[u8], seed: &mut u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let n = 1 + splitmix64(seed) % 3;
    for _ in 0..n {
        let r = splitmix64(seed);
        let at = if b.is_empty() { 0 } else { (splitmix64(seed) % b.len() as u64) as usize };
        // bias towards the start of the file, where the headers are
        let near = at % 128.min(b.len().max(1));
        match r % 7 {
            0 if !b.is_empty() => b[at] ^= 1 << ((r >> 8) % 8),
            1 if !b.is_empty() => b[near] = (r >> 8) as u8,
            2 => {
                let v = EDGES[(r >> 8) as usize % EDGES.len()].to_le_bytes();
                let end = (near + 8).min(b.len());
                b[near..end].copy_from_slice(&v[..end - near]);
            }
            3 => b.truncate(at),
            4 => b.extend((0..1 + r % 64).map(|i| (r >> (i % 8)) as u8)),
            _ => {
                // a number in JSON text (or any digit run) replaced by an edge
                let starts: Vec<usize> = (0..b.len()).filter(|&i| b[i].is_ascii_digit() && (i == 0 || !b[i - 1].is_ascii_digit())).collect();
                if let Some(&s) = starts.get((r >> 8) as usize % starts.len().max(1)) {
                    let e = (s..b.len()).find(|&i| !b[i].is_ascii_digit()).unwrap_or(b.len());
                    let edge = JSON_EDGES[(r >> 16) as usize % JSON_EDGES.len()].as_bytes();
                    b.splice(s..e, edge.iter().copied());
                } else if !b.is_empty() {
                    b[at] = !b[at];
                }
            }
        }
    }
    b
}

/// Runs `read` on `CASES` corruptions of the file at `path` (restored afterwards): no panic, no
/// allocation above `max_alloc`, and errors name a file under `names_under`.
fn hostile(path: &Path, names_under: &Path, seed: u64, max_alloc: usize, read: &dyn Fn() -> Result<(), Error>) -> (u64, u64) {
    let good = std::fs::read(path).unwrap();
    read().unwrap_or_else(|e| panic!("the valid file does not read: {e}"));
    let (mut ok, mut refused) = (0, 0);
    let mut s = seed;
    for case in 0..CASES {
        let bad = mutate(&good, &mut s);
        std::fs::write(path, &bad).unwrap();
        LARGEST.with(|m| m.set(0));
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(read));
        let largest = LARGEST.with(|m| m.get());
        let keep = path.with_extension(format!("case{case}"));
        let fail = |what: String| {
            std::fs::write(&keep, &bad).unwrap();
            panic!("case {case} of {} (kept as {}): {what}", path.display(), keep.display())
        };
        match r {
            Err(_) => fail("panicked".into()),
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                refused += 1;
                let named = matches!(&e, Error::File { path: p, .. } if p.starts_with(names_under));
                if !named {
                    fail(format!("the error names no file under {}: {e}", names_under.display()));
                }
            }
        }
        if largest > max_alloc {
            fail(format!("allocated {largest} bytes at once (file of {} bytes)", bad.len()));
        }
    }
    std::fs::write(path, &good).unwrap();
    (ok, refused)
}

/// The largest allocation a read of a file of `len` bytes may make: a few times the file, plus
/// a fixed allowance for buffers and parsers.
fn allowance(len: u64) -> usize {
    (4 * len + (16 << 20)) as usize
}

#[test]
fn corrupted_token_files_are_read_or_refused_naming_the_file() {
    let d = tmpdir("mut_tok");
    let tokens: Vec<i32> = (0..300).map(|i| (i * 7) % 250).collect();
    let mask: Vec<bool> = (0..300).map(|i| i % 3 != 0).collect();
    for (i, masked) in [false, true].into_iter().enumerate() {
        let p = d.join(format!("t{i}.bin"));
        write_token_file(&p, &tokens, masked.then_some(&mask[..]), Some(256)).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        let (ok, refused) = hostile(&p, &p, 11 + i as u64, allowance(len), &|| {
            read_header(&p)?;
            read_token_file(&p, Some(256)).map(|_| ())
        });
        assert!(refused > CASES / 2 && ok + refused == CASES, "{ok} read, {refused} refused");
    }
}

#[test]
fn corrupted_safetensors_files_are_read_or_refused_naming_the_file() {
    let d = tmpdir("mut_st");
    let p = d.join("model.safetensors");
    let a: Vec<u8> = (0..96u32).flat_map(|i| (i as f32 * 0.25).to_le_bytes()).collect();
    let b: Vec<u8> = (0..40u16).flat_map(|i| half::bf16::from_f32(i as f32).to_bits().to_le_bytes()).collect();
    let views = [
        TensorView { name: "model.embed_tokens.weight".into(), dtype: StDtype::F32, shape: vec![8, 12], data: &a },
        TensorView { name: "model.norm.weight".into(), dtype: StDtype::BF16, shape: vec![40], data: &b },
    ];
    write_safetensors(&p, &views, None).unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    let (_, refused) = hostile(&p, &p, 23, allowance(len), &|| {
        let f = SafeTensorsFile::open(&p)?;
        let names: Vec<String> = f.names().map(String::from).collect();
        for n in names {
            f.read_f32(&n)?;
        }
        Ok(())
    });
    assert!(refused > CASES / 2, "{refused} refused");
}

#[test]
fn corrupted_model_configs_are_read_or_refused_naming_the_file() {
    let d = tmpdir("mut_cfg");
    let cfg = serde_json::to_string_pretty(&llmq_core::ModelConfig::builtin("tiny").unwrap().to_hf_json("float32")).unwrap();
    let p = d.join("config.json");
    std::fs::write(&p, &cfg).unwrap();
    let (ok, refused) = hostile(&p, &p, 37, allowance(cfg.len() as u64), &|| llmq_io::hf::load_config(&d).map(|_| ()));
    assert!(ok > 0 && refused > 0, "{ok} read, {refused} refused");
}

#[test]
fn corrupted_checkpoints_are_read_or_refused_naming_the_file() {
    let root = tmpdir("mut_ckpt");
    let w: Vec<u8> = (0..64u32).flat_map(|i| (i as f32).to_le_bytes()).collect();
    let m: Vec<u8> = (0..32u16).flat_map(|i| i.to_le_bytes()).collect();
    let tensors = [
        TensorRef { name: "w", dtype: DType::F32, shape: &[8, 8], data: &w },
        TensorRef { name: "opt.m", dtype: DType::BF16, shape: &[32], data: &m },
    ];
    let dir = ckpt::write_checkpoint(&root, 3, &Lineage::fresh(), &tensors, &serde_json::json!({"step": 3, "rng": [1, 2]})).unwrap();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    for (i, f) in files.iter().enumerate() {
        let len = std::fs::metadata(f).unwrap().len();
        hostile(f, &dir, 41 + i as u64, allowance(len.max(4096)), &|| ckpt::load_checkpoint(&dir).map(|_| ()));
    }
}

#[test]
fn corrupted_parquet_files_are_read_or_refused_naming_the_file() {
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    let d = tmpdir("mut_pq");
    let p = d.join("texts.parquet");
    let schema = std::sync::Arc::new(parquet::schema::parser::parse_message_type("message m { required binary text (UTF8); }").unwrap());
    let mut w = SerializedFileWriter::new(std::fs::File::create(&p).unwrap(), schema, std::sync::Arc::new(WriterProperties::builder().build())).unwrap();
    for g in 0..2 {
        let mut rg = w.next_row_group().unwrap();
        let mut cw = rg.next_column().unwrap().unwrap();
        let v: Vec<ByteArray> = (0..20).map(|i| ByteArray::from(format!("text {g} {i}").as_str())).collect();
        cw.typed::<ByteArrayType>().write_batch(&v, None, None).unwrap();
        cw.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    hostile(&p, &p, 53, allowance(len), &|| {
        let c = llmq_io::parquet_input::ParquetColumn::open(&p, "text")?;
        let mut first = 0;
        for g in 0..c.row_groups() {
            first += c.read_row_group(g, first, &mut |_, _| Ok(()))?;
        }
        Ok(())
    });
}

#[test]
fn corrupted_tokenizers_are_loaded_or_refused_naming_the_file() {
    let d = tmpdir("mut_tokenizer");
    let vocab: serde_json::Map<String, serde_json::Value> =
        ["[UNK]", "[EOS]", "hello", "world", "foo", "bar"].iter().enumerate().map(|(i, w)| (w.to_string(), serde_json::Value::from(i))).collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "normalizer": null, "post_processor": null, "decoder": null,
        "added_tokens": [{"id": 1, "content": "[EOS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "pre_tokenizer": {"type": "Whitespace"},
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    let p = d.join("tokenizer.json");
    std::fs::write(&p, serde_json::to_string_pretty(&tok).unwrap()).unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    let (ok, refused) = hostile(&p, &p, 67, allowance(len), &|| {
        let t = llmq_io::tokenize::load_tokenizer(&d)?;
        let enc = t.encode("hello world [EOS] bar zzz", false).map_err(|e| Error::file(&p, format!("cannot encode: {e}")))?;
        t.decode(enc.get_ids(), false).map_err(|e| Error::file(&p, format!("cannot decode: {e}")))?;
        Ok(())
    });
    assert!(ok > 0 && refused > 0, "{ok} loaded, {refused} refused");
}
