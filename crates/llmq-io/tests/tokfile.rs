mod common;
use common::*;
use llmq_io::tokfile::*;
use std::path::Path;

fn header(version: i32, bpt: i32, n: i32, vocab: i32, masks: i32) -> Vec<u8> {
    let mut h = MAGIC.to_vec();
    for v in [version, bpt, n, vocab, masks] {
        h.extend_from_slice(&v.to_le_bytes());
    }
    h.resize(1024, 0);
    h
}

fn raw_file(p: &Path, h: Vec<u8>, tokens: &[i32], tail: &[u8]) {
    let mut b = h;
    tokens.iter().for_each(|t| b.extend_from_slice(&t.to_le_bytes()));
    b.extend_from_slice(tail);
    std::fs::write(p, b).unwrap();
}

#[test]
fn round_trip_versions_and_masks() {
    let d = tmpdir("tok_rt");
    let toks: Vec<i32> = (0..21).map(|i| (i * 7) % 50).collect();
    let mask: Vec<bool> = (0..21).map(|i| i % 3 != 0).collect();
    for (vocab, m) in [(None, None), (None, Some(&mask[..])), (Some(50u32), None), (Some(50u32), Some(&mask[..]))] {
        let p = d.join("t.bin");
        let info = write_token_file(&p, &toks, m, vocab).unwrap();
        assert_eq!(info.version, if vocab.is_some() { 2 } else { 1 });
        assert_eq!(info.n_tokens, 21);
        assert_eq!(info.vocab_size, vocab);
        assert_eq!(info.has_masks, m.is_some());
        let size = std::fs::metadata(&p).unwrap().len();
        assert_eq!(size, 1024 + 84 + if m.is_some() { 3 } else { 0 });
        // exact header layout
        let b = std::fs::read(&p).unwrap();
        assert_eq!(&b[0..8], b"BIN.TOK\n");
        let f = |o: usize| i32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!((f(8), f(12), f(16), f(20), f(24)), (info.version, 4, 21, vocab.unwrap_or(0) as i32, m.is_some() as i32));
        assert_eq!(f(1024), toks[0]);
        if m.is_some() {
            // LSB first: bits 0, 3, 6 are zero in byte 0 -> 0b1011_0110
            assert_eq!(b[1024 + 84], 0b1011_0110);
        }
        let data = read_token_file(&p, None).unwrap();
        assert_eq!(data.tokens, toks);
        assert_eq!(data.mask.as_deref(), m);
        assert_eq!(data.info, info);
        // random access
        let mut r = TokenFileReader::open(&p).unwrap();
        let mut out = [0i32; 5];
        r.read_tokens(9, &mut out).unwrap();
        assert_eq!(&out, &toks[9..14]);
        let mut mo = [false; 11];
        r.read_mask(7, &mut mo).unwrap();
        if m.is_some() {
            assert_eq!(&mo[..], &mask[7..18]);
        } else {
            assert!(mo.iter().all(|&x| x));
        }
        assert!(r.read_tokens(18, &mut out).is_err());
    }
}

#[test]
fn reads_files_written_like_the_reference_script() {
    // the reference's writer pads the header with '*' and ends it with '\n'
    let d = tmpdir("tok_ref");
    let p = d.join("ref.bin");
    let mut h = vec![b'*'; 1023];
    h.push(b'\n');
    h[..8].copy_from_slice(MAGIC);
    for (i, v) in [2i32, 4, 3, 151643, 0].iter().enumerate() {
        h[8 + 4 * i..12 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    // EOS = 151643 = the header's (base) vocab size: accepted against the model's vocab
    raw_file(&p, h.clone(), &[10, 20, 151643], &[]);
    let data = read_token_file(&p, Some(151936)).unwrap();
    assert_eq!(data.tokens, vec![10, 20, 151643]);
    // without a model vocab the header's is the bound
    assert_file_err(read_token_file(&p, None), &p, &["token 2", "151643", "outside the vocabulary"]);
    // version 1 with '*' padding where vocab_size/has_masks would be
    let mut h1 = h.clone();
    h1[8..12].copy_from_slice(&1i32.to_le_bytes());
    h1[20..28].copy_from_slice(b"********");
    raw_file(&p, h1, &[1, 2, 3], &[]);
    let data = read_token_file(&p, None).unwrap();
    assert_eq!((data.info.version, data.info.vocab_size, data.info.has_masks), (1, None, false));
}

#[test]
fn malformed_files_give_clear_errors() {
    let d = tmpdir("tok_bad");
    let p = d.join("bad.bin");
    let toks = [1, 2, 3, 4];

    raw_file(&p, header(2, 4, 4, 10, 0), &toks, &[]);
    read_token_file(&p, None).unwrap();

    let mut h = header(2, 4, 4, 10, 0);
    h[..8].copy_from_slice(b"BIN.TOX\n");
    raw_file(&p, h, &toks, &[]);
    assert_file_err(read_header(&p), &p, &["magic", "BIN.TOX"]);

    raw_file(&p, header(3, 4, 4, 10, 0), &toks, &[]);
    assert_file_err(read_header(&p), &p, &["`version`", "unsupported version 3", "expected 1 or 2"]);

    raw_file(&p, header(2, 2, 4, 10, 0), &toks, &[]);
    assert_file_err(read_header(&p), &p, &["`bytes_per_token`", "expected 4, got 2"]);

    raw_file(&p, header(2, 4, -5, 10, 0), &toks, &[]);
    assert_file_err(read_header(&p), &p, &["`n_tokens`", "negative", "-5"]);

    // truncated body: claims 4 tokens, holds 3 and a half
    let mut b = header(2, 4, 4, 10, 0);
    [1i32, 2, 3].iter().for_each(|t| b.extend_from_slice(&t.to_le_bytes()));
    b.extend_from_slice(&[0, 0]);
    std::fs::write(&p, &b).unwrap();
    assert_file_err(read_header(&p), &p, &["truncated body", "n_tokens = 4", "1040", "1038"]);

    // a huge n_tokens claim in a small file is rejected before any allocation
    raw_file(&p, header(2, 4, i32::MAX, 10, 0), &toks, &[]);
    assert_file_err(read_token_file(&p, None), &p, &["truncated body", "2147483647"]);

    // trailing bytes
    raw_file(&p, header(2, 4, 4, 10, 0), &toks, &[9]);
    assert_file_err(read_header(&p), &p, &["trailing bytes"]);

    // mask declared but absent
    raw_file(&p, header(2, 4, 4, 10, 1), &toks, &[]);
    assert_file_err(read_header(&p), &p, &["truncated body", "loss mask"]);

    // has_masks garbage in version 2
    raw_file(&p, header(2, 4, 4, 10, 7), &toks, &[]);
    assert_file_err(read_header(&p), &p, &["`has_masks`", "got 7"]);

    // non-positive vocab in version 2
    raw_file(&p, header(2, 4, 4, 0, 0), &toks, &[]);
    assert_file_err(read_header(&p), &p, &["`vocab_size`"]);

    // token outside the header's vocabulary, or the model's
    raw_file(&p, header(2, 4, 4, 4, 0), &toks, &[]);
    assert_file_err(read_token_file(&p, None), &p, &["token 3", "id 4", "0..4"]);
    raw_file(&p, header(2, 4, 4, 10, 0), &toks, &[]);
    assert_file_err(read_token_file(&p, Some(3)), &p, &["token 2", "id 3", "0..3"]);
    raw_file(&p, header(1, 4, 4, 0, 0), &[1, -2, 3, 4], &[]);
    assert_file_err(read_token_file(&p, None), &p, &["token 1", "id -2"]);

    // shorter than a header
    std::fs::write(&p, b"BIN.TOK\n").unwrap();
    assert_file_err(read_header(&p), &p, &["truncated", "8 bytes"]);

    // nonzero padding bits of the mask
    raw_file(&p, header(2, 4, 4, 10, 1), &toks, &[0xFF]);
    assert_file_err(read_token_file(&p, None), &p, &["padding bits"]);

    // the writer refuses ids outside the vocabulary and leaves no file
    let q = d.join("w.bin");
    let r = write_token_file(&q, &[1, 2, 10], None, Some(10));
    assert_file_err(r, &q, &["token 2", "id 10"]);
    assert!(!q.exists());
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    assert!(write_token_file(&q, &[1, 2], Some(&[true]), Some(10)).is_err());
}
