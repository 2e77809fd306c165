mod common;
use common::*;
use llmq_core::DType;
use llmq_io::ckpt::*;
use std::path::Path;

#[test]
fn xxh64_matches_reference_vectors() {
    assert_eq!(xxh64(b""), 0xEF46_DB37_51D8_E999);
    assert_eq!(xxh64(b"a"), 0xD24E_C4F1_A98C_6E5B);
    assert_eq!(xxh64(b"abc"), 0x44BC_2CF5_AD77_0999);
    // 39 bytes: exercises the 32-byte stripe path (python-xxhash's documented example)
    assert_eq!(xxh64(b"Nobody inspects the spammish repetition"), 0xFBCE_A83C_8A37_8BF1);
    // streaming in odd pieces equals one shot, for lengths around the 32-byte stripe
    let data: Vec<u8> = (0..1000u32).map(|i| (i * 31 + 7) as u8).collect();
    for len in [0usize, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 65, 999, 1000] {
        let one = xxh64(&data[..len]);
        for step in [1usize, 5, 13, 32, 100] {
            let mut h = Xxh64::new(0);
            for c in data[..len].chunks(step) {
                h.update(c);
            }
            assert_eq!(h.digest(), one, "len {len} step {step}");
        }
    }
}

struct Payload {
    w: Vec<f32>,
    m: Vec<u16>,
    idx: Vec<u8>,
}

fn payload(step: u64) -> Payload {
    Payload {
        w: (0..300).map(|i| i as f32 * 0.25 + step as f32).collect(),
        m: (0..64).map(|i| (i as u16).wrapping_mul(257) ^ step as u16).collect(),
        idx: (0..12).flat_map(|i: i32| (i - 3).to_le_bytes()).collect(),
    }
}

fn save(root: &Path, step: u64) -> std::path::PathBuf {
    let p = payload(step);
    let tensors = [
        TensorRef { name: "block.0/master", dtype: DType::F32, shape: &[3, 100], data: f32_as_bytes(&p.w) },
        TensorRef { name: "block.0/adam_m", dtype: DType::BF16, shape: &[64], data: u16_as_bytes(&p.m) },
        TensorRef { name: "ids", dtype: DType::I32, shape: &[12], data: &p.idx },
    ];
    write_checkpoint(root, step, &tensors, &serde_json::json!({"step": step, "loader": {"epoch": 1}})).unwrap()
}

#[test]
fn write_list_load_round_trip() {
    let root = tmpdir("ck_rt").join("ckpts");
    assert_eq!(list_complete(&root).unwrap(), Vec::<u64>::new());
    assert_eq!(latest_complete(&root).unwrap(), None);
    let d10 = save(&root, 10);
    assert_eq!(d10, root.join("step_00000010"));
    save(&root, 20);
    assert_eq!(list_complete(&root).unwrap(), vec![10, 20]);
    assert_eq!(latest_complete(&root).unwrap(), Some((20, root.join("step_00000020"))));
    let c = load_checkpoint(&root.join("step_00000020")).unwrap();
    assert_eq!(c.step, 20);
    assert_eq!(c.state["loader"]["epoch"], 1);
    let p = payload(20);
    let w = c.tensor("block.0/master").unwrap();
    assert_eq!((w.dtype, w.shape.clone()), (DType::F32, vec![3, 100]));
    assert_eq!(w.to_f32().unwrap(), p.w);
    assert_eq!(bytes_to_u16(&c.tensor("block.0/adam_m").unwrap().data), p.m);
    assert_eq!(c.tensor("ids").unwrap().data, p.idx);
    assert!(c.tensor("nope").is_err());
    // no temporaries left
    let names: Vec<String> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    assert!(names.iter().all(|n| n.starts_with("step_")), "{names:?}");
    // rewriting a step replaces it
    save(&root, 20);
    assert_eq!(list_complete(&root).unwrap(), vec![10, 20]);
    load_checkpoint(&root.join("step_00000020")).unwrap();
    // resolve --continue
    assert_eq!(resolve_continue(&root, None).unwrap(), root.join("step_00000020"));
    assert_eq!(resolve_continue(&root, Some("10")).unwrap(), root.join("step_00000010"));
    assert_eq!(resolve_continue(&root, Some(d10.to_str().unwrap())).unwrap(), d10);
    assert!(resolve_continue(&root, Some("30")).is_err());
    // byte sizes must match dtype x shape
    let r = write_checkpoint(&root, 30, &[TensorRef { name: "x", dtype: DType::F32, shape: &[3], data: &[0; 8] }], &serde_json::json!({}));
    assert_err_contains(r, &["`x`", "8 bytes"]);
    assert_eq!(list_complete(&root).unwrap(), vec![10, 20]);
    assert!(!root.join("step_00000030").exists());
}

#[test]
fn damaged_checkpoints_are_never_chosen_and_fail_loudly() {
    let root = tmpdir("ck_damage");
    for s in 1..=5 {
        save(&root, s);
    }
    let dir = |s: u64| checkpoint_dir(&root, s);
    let first_file = |s: u64| {
        let mut v: Vec<_> = std::fs::read_dir(dir(s)).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "bin")).collect();
        v.sort();
        v[0].clone()
    };

    // 5: the manifest never got written
    std::fs::remove_file(dir(5).join(MANIFEST)).unwrap();
    assert_eq!(latest_complete(&root).unwrap().unwrap().0, 4);
    assert_file_err(load_checkpoint(&dir(5)), &dir(5).join(MANIFEST), &["incomplete checkpoint", "manifest"]);

    // 4: a tensor file cut short
    let f4 = first_file(4);
    let len = std::fs::metadata(&f4).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f4).unwrap().set_len(len - 10).unwrap();
    assert_eq!(latest_complete(&root).unwrap().unwrap().0, 3);
    assert_file_err(load_checkpoint(&dir(4)), &f4, &["block.0/master", &format!("{} bytes", len - 10), &format!("says {len}")]);

    // 3: one byte flipped (sizes still match: only the checksum notices)
    let f3 = first_file(3);
    let mut b = std::fs::read(&f3).unwrap();
    b[17] ^= 0x40;
    std::fs::write(&f3, &b).unwrap();
    assert_eq!(latest_complete(&root).unwrap().unwrap().0, 2);
    assert_file_err(load_checkpoint(&dir(3)), &f3, &["block.0/master", "corrupt"]);
    assert!(verify_checkpoint(&dir(3)).is_err());

    // 2: a tensor file deleted
    let f2 = first_file(2);
    std::fs::remove_file(&f2).unwrap();
    assert_eq!(latest_complete(&root).unwrap().unwrap().0, 1);
    assert_file_err(load_checkpoint(&dir(2)), &f2, &["missing"]);

    // a manifest cut short
    save(&root, 6);
    let m6 = dir(6).join(MANIFEST);
    let text = std::fs::read(&m6).unwrap();
    std::fs::write(&m6, &text[..text.len() / 2]).unwrap();
    assert_eq!(latest_complete(&root).unwrap().unwrap().0, 1);
    assert_file_err(load_checkpoint(&dir(6)), &m6, &["not valid JSON"]);

    // a complete-looking temporary directory of a crashed writer (renaming never happened)
    save(&root, 7);
    let tmp = root.join(".tmp_step_00000008_999999999");
    std::fs::rename(dir(7), &tmp).unwrap();
    assert_eq!(latest_complete(&root).unwrap().unwrap().0, 1);
    assert!(!list_complete(&root).unwrap().contains(&8));
    // a step directory renamed to the wrong step
    save(&root, 9);
    std::fs::rename(dir(9), dir(10)).unwrap();
    assert_eq!(latest_complete(&root).unwrap().unwrap().0, 1);
    assert_err_contains(load_checkpoint(&dir(10)), &["step 10", "manifest says step 9"]);

    // sizes-only listing: 1 and the byte-flipped 3
    assert_eq!(list_complete(&root).unwrap(), vec![1, 3]);
    // prune removes the crashed writer's temporary, keeps incomplete step dirs alone
    let removed = prune(&root, 5, None).unwrap();
    assert_eq!(removed, vec![tmp.clone()]);
    assert!(!tmp.exists());
    assert!(dir(5).exists());
}

#[test]
fn prune_keeps_last_and_major() {
    let root = tmpdir("ck_prune");
    for s in (100..=1000).step_by(100) {
        save(&root, s);
    }
    std::fs::create_dir_all(root.join(".tmp_step_00001100_4000000000")).unwrap();
    let ours = root.join(format!(".tmp_step_00001200_{}", std::process::id()));
    std::fs::create_dir_all(&ours).unwrap();
    let removed = prune(&root, 2, Some(500)).unwrap();
    assert_eq!(removed.len(), 7 + 1);
    assert_eq!(list_complete(&root).unwrap(), vec![500, 900, 1000]);
    assert!(ours.exists(), "a live writer's temporary stays");
    // keep_last 0 and no majors: everything complete goes
    prune(&root, 0, None).unwrap();
    assert_eq!(list_complete(&root).unwrap(), Vec::<u64>::new());
    // steps past 10^8 work too
    save(&root, 123_456_789_012);
    assert_eq!(latest_complete(&root).unwrap().unwrap().0, 123_456_789_012);
    assert_eq!(prune(&root, 1, None).unwrap(), Vec::<std::path::PathBuf>::new());
}
