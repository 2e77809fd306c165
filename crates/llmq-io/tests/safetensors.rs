mod common;
use common::*;
use llmq_io::safetensors::*;
use std::collections::BTreeMap;
use std::path::Path;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A raw safetensors file from a header string and data bytes.
fn raw(path: &Path, header: &str, data: &[u8]) {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend_from_slice(header.as_bytes());
    b.extend_from_slice(data);
    std::fs::write(path, b).unwrap();
}

#[test]
fn round_trip_all_float_types() {
    let d = tmpdir("st_rt");
    let p = d.join("m.safetensors");
    let a: Vec<f32> = (0..6).map(|i| i as f32 * 0.5 - 1.0).collect();
    let bf: Vec<u8> = a.iter().flat_map(|x| llmq_core::dtype::f32_to_bf16(*x).to_le_bytes()).collect();
    let h: Vec<u8> = a.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect();
    let fa = f32_bytes(&a);
    let meta: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    // given out of order: the writer sorts
    write_safetensors(
        &p,
        &[
            TensorView { name: "z.f32".into(), dtype: StDtype::F32, shape: vec![2, 3], data: &fa },
            TensorView { name: "a.bf16".into(), dtype: StDtype::BF16, shape: vec![6], data: &bf },
            TensorView { name: "m.f16".into(), dtype: StDtype::F16, shape: vec![3, 2], data: &h },
            TensorView { name: "empty".into(), dtype: StDtype::F32, shape: vec![0, 4], data: &[] },
        ],
        Some(&meta),
    )
    .unwrap();
    let raw_bytes = std::fs::read(&p).unwrap();
    let hlen = u64::from_le_bytes(raw_bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(hlen % 8, 0, "header padded to 8 bytes");
    let htext = std::str::from_utf8(&raw_bytes[8..8 + hlen]).unwrap();
    assert!(htext.ends_with('}') || htext.ends_with(' '));
    // sorted: data offsets follow name order
    let a_pos = htext.find("a.bf16").unwrap();
    let z_pos = htext.find("z.f32").unwrap();
    assert!(a_pos < z_pos);

    let f = SafeTensorsFile::open(&p).unwrap();
    assert_eq!(f.names().collect::<Vec<_>>(), vec!["a.bf16", "empty", "m.f16", "z.f32"]);
    assert_eq!(f.metadata().get("format").map(|s| s.as_str()), Some("pt"));
    assert_eq!(f.info("z.f32").unwrap().shape, vec![2, 3]);
    assert_eq!(f.read_bytes("z.f32").unwrap(), fa);
    assert_eq!(f.read_bytes("a.bf16").unwrap(), bf);
    assert_eq!(f.read_f32("z.f32").unwrap(), a);
    assert_eq!(f.read_f32("a.bf16").unwrap(), a); // exactly representable values
    assert_eq!(f.read_f32("m.f16").unwrap(), a);
    assert_eq!(f.read_f32("empty").unwrap(), Vec::<f32>::new());
    // no temporary left behind
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 1);
    // missing tensor names the tensor
    assert_file_err(f.read_bytes("nope"), &p, &["`nope`"]);
}

#[test]
fn writer_rejects_wrong_sizes_and_leaves_nothing() {
    let d = tmpdir("st_wbad");
    let p = d.join("m.safetensors");
    let r = write_safetensors(&p, &[TensorView { name: "x".into(), dtype: StDtype::F32, shape: vec![3], data: &[0u8; 8] }], None);
    assert_file_err(r, &p, &["`x`", "8 bytes", "needs 12"]);
    assert!(!p.exists());
    assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
    let r = write_safetensors(
        &p,
        &[
            TensorView { name: "x".into(), dtype: StDtype::F32, shape: vec![1], data: &[0u8; 4] },
            TensorView { name: "x".into(), dtype: StDtype::F32, shape: vec![1], data: &[0u8; 4] },
        ],
        None,
    );
    assert_file_err(r, &p, &["`x`", "twice"]);
}

#[test]
fn hostile_files_give_file_errors() {
    let d = tmpdir("st_hostile");
    let good_entry = |name: &str, b: u64, e: u64, shape: &str| {
        format!(r#""{name}":{{"dtype":"F32","shape":{shape},"data_offsets":[{b},{e}]}}"#)
    };

    // shorter than the length field
    let p = d.join("tiny.safetensors");
    std::fs::write(&p, [1u8, 2, 3]).unwrap();
    assert_file_err(SafeTensorsFile::open(&p), &p, &["truncated", "3 bytes"]);

    // empty file
    let p = d.join("empty.safetensors");
    std::fs::write(&p, []).unwrap();
    assert_file_err(SafeTensorsFile::open(&p), &p, &["truncated"]);

    // header length past the end of the file
    let p = d.join("past.safetensors");
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&p, &b).unwrap();
    assert_file_err(SafeTensorsFile::open(&p), &p, &["header length 1000", "past the end"]);

    // u64::MAX header length
    let p = d.join("huge.safetensors");
    let mut b = u64::MAX.to_le_bytes().to_vec();
    b.extend_from_slice(b"{}");
    std::fs::write(&p, &b).unwrap();
    assert_file_err(SafeTensorsFile::open(&p), &p, &["header length 18446744073709551615"]);

    // a header length over the 100 MB cap, inside a (sparse) file that is large enough
    let p = d.join("cap.safetensors");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&p).unwrap();
        f.write_all(&150_000_000u64.to_le_bytes()).unwrap();
        f.set_len(200_000_000).unwrap();
    }
    assert_file_err(SafeTensorsFile::open(&p), &p, &["150000000", "limit"]);
    std::fs::remove_file(&p).unwrap();

    // not JSON
    let p = d.join("nojson.safetensors");
    raw(&p, "this is not json", &[]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["not a valid JSON"]);
    // JSON but not an object
    raw(&p, "[1, 2, 3]", &[]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["not a valid JSON object"]);
    // not UTF-8
    let mut b = 4u64.to_le_bytes().to_vec();
    b.extend_from_slice(&[0xff, 0xfe, 0xfd, 0xfc]);
    std::fs::write(&p, &b).unwrap();
    assert_file_err(SafeTensorsFile::open(&p), &p, &["UTF-8"]);

    // overlapping tensors
    let p = d.join("overlap.safetensors");
    raw(&p, &format!("{{{},{}}}", good_entry("a", 0, 16, "[4]"), good_entry("b", 8, 24, "[4]")), &[0u8; 24]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`a`", "`b`", "overlap"]);

    // bytes past the last tensor (an appended or concatenated file)
    let p = d.join("trailing.safetensors");
    raw(&p, &format!("{{{}}}", good_entry("a", 0, 16, "[4]")), &[0u8; 20]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["4 trailing bytes", "20 bytes", "end at byte 16"]);

    // offsets past the data section
    let p = d.join("range.safetensors");
    raw(&p, &format!("{{{}}}", good_entry("w", 0, 16, "[4]")), &[0u8; 12]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "data_offsets", "out of range", "12 bytes"]);

    // begin > end
    let p = d.join("order.safetensors");
    raw(&p, &format!("{{{}}}", good_entry("w", 16, 0, "[4]")), &[0u8; 16]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "begin 16 > end 0"]);

    // byte size does not match dtype x shape
    let p = d.join("size.safetensors");
    raw(&p, &format!("{{{}}}", good_entry("w", 0, 16, "[5]")), &[0u8; 16]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "byte size mismatch", "needs 20", "give 16"]);
    raw(&p, r#"{"w":{"dtype":"BF16","shape":[4],"data_offsets":[0,16]}}"#, &[0u8; 16]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "BF16", "needs 8"]);

    // unknown dtype
    let p = d.join("dtype.safetensors");
    raw(&p, r#"{"w":{"dtype":"Q4","shape":[4],"data_offsets":[0,16]}}"#, &[0u8; 16]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "dtype", "\"Q4\""]);

    // bad shapes
    let p = d.join("shape.safetensors");
    raw(&p, r#"{"w":{"dtype":"F32","shape":[-4],"data_offsets":[0,16]}}"#, &[0u8; 16]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "shape"]);
    raw(&p, r#"{"w":{"dtype":"F32","shape":"4","data_offsets":[0,16]}}"#, &[0u8; 16]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "shape"]);
    raw(&p, r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,16]}}"#, &[0u8; 16]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "overflows"]);
    raw(&p, r#"{"w":{"dtype":"F32","shape":[4611686018427387904],"data_offsets":[0,16]}}"#, &[0u8; 16]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "overflows"]);

    // missing fields, malformed offsets, unknown fields
    let p = d.join("fields.safetensors");
    raw(&p, r#"{"w":{"dtype":"F32","shape":[4]}}"#, &[0u8; 16]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "data_offsets"]);
    raw(&p, r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0]}}"#, &[0u8; 16]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "data_offsets"]);
    raw(&p, r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16],"x":1}}"#, &[0u8; 16]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "unknown field `x`"]);
    raw(&p, r#"{"w":[1,2]}"#, &[0u8; 16]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "object"]);

    // duplicate names (serde_json would silently keep the last)
    let p = d.join("dup.safetensors");
    raw(&p, &format!("{{{},{}}}", good_entry("w", 0, 16, "[4]"), good_entry("w", 16, 32, "[4]")), &[0u8; 32]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["`w`", "duplicate"]);

    // metadata must be a string map
    let p = d.join("meta.safetensors");
    raw(&p, r#"{"__metadata__":{"format":3}}"#, &[]);
    assert_file_err(SafeTensorsFile::open(&p), &p, &["__metadata__", "format"]);
    raw(&p, r#"{"__metadata__":{"format":"pt"}}"#, &[]);
    assert!(SafeTensorsFile::open(&p).unwrap().tensors().is_empty());

    // a file truncated after it was opened: the read fails cleanly
    let p = d.join("later.safetensors");
    raw(&p, &format!("{{{}}}", good_entry("w", 0, 16, "[4]")), &[0u8; 16]);
    let f = SafeTensorsFile::open(&p).unwrap();
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len - 4).unwrap();
    assert_file_err(f.read_bytes("w"), &p, &["`w`", "cannot read 16 bytes"]);

    // missing file
    let p = d.join("absent.safetensors");
    assert_file_err(SafeTensorsFile::open(&p), &p, &["cannot open"]);
}

#[test]
fn conversions() {
    let vals = [0.0f32, -1.5, 3.25, 65504.0, 1e-3];
    for dt in [StDtype::F32, StDtype::BF16, StDtype::F16] {
        let mut b = Vec::new();
        encode_from_f32(dt, &vals, &mut b).unwrap();
        assert_eq!(b.len(), vals.len() * dt.size());
        let mut out = vec![0f32; vals.len()];
        decode_to_f32(dt, &b, &mut out).unwrap();
        for (o, v) in out.iter().zip(vals) {
            let tol = match dt {
                StDtype::F32 => 0.0,
                StDtype::BF16 => v.abs() / 128.0,
                _ => v.abs() / 1024.0,
            };
            assert!((o - v).abs() <= tol, "{dt}: {o} vs {v}");
        }
    }
    let mut out = vec![0f32; 2];
    assert!(decode_to_f32(StDtype::F32, &[0u8; 7], &mut out).is_err());
    assert!(decode_to_f32(StDtype::U8, &[0u8; 2], &mut out).is_err());
}
