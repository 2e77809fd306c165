mod common;
use common::*;
use llmq_core::DType;
use llmq_io::ckpt::*;
use llmq_io::retention::Retention;
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

fn run(id: &str) -> Lineage {
    Lineage { run: id.into(), ancestry: vec![] }
}

fn save(root: &Path, step: u64) -> std::path::PathBuf {
    save_in(root, step, &run("r1"))
}

fn save_in(root: &Path, step: u64, lineage: &Lineage) -> std::path::PathBuf {
    let p = payload(step);
    let tensors = [
        TensorRef { name: "block.0/master", dtype: DType::F32, shape: &[3, 100], data: f32_as_bytes(&p.w) },
        TensorRef { name: "block.0/adam_m", dtype: DType::BF16, shape: &[64], data: u16_as_bytes(&p.m) },
        TensorRef { name: "ids", dtype: DType::I32, shape: &[12], data: &p.idx },
    ];
    write_checkpoint(root, step, lineage, &tensors, &serde_json::json!({"step": step, "loader": {"epoch": 1}})).unwrap()
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
    let r = write_checkpoint(&root, 30, &run("r1"), &[TensorRef { name: "x", dtype: DType::F32, shape: &[3], data: &[0; 8] }], &serde_json::json!({}));
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
    assert_file_err(load_checkpoint(&dir(6)), &m6, &["does not match its commit record"]);

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
    let removed = Retention::new(5, None).unwrap().prune(&root).unwrap().removed;
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
    let removed = Retention::new(2, Some(500)).unwrap().prune(&root).unwrap().removed;
    assert_eq!(removed.len(), 7 + 1);
    assert_eq!(list_complete(&root).unwrap(), vec![500, 900, 1000]);
    assert!(ours.exists(), "a live writer's temporary stays");
    // steps past 10^8 work too
    save(&root, 123_456_789_012);
    assert_eq!(latest_complete(&root).unwrap().unwrap().0, 123_456_789_012);
    assert_eq!(Retention::new(2, None).unwrap().prune(&root).unwrap().removed, vec![checkpoint_dir(&root, 900), checkpoint_dir(&root, 500)]);
}

#[test]
fn keep_last_zero_keeps_everything_and_one_is_refused() {
    let root = tmpdir("ck_keep0");
    for s in 1..=4 {
        save(&root, s);
    }
    let mut r = Retention::new(0, None).unwrap();
    r.written(4);
    assert!(r.prune(&root).unwrap().removed.is_empty());
    assert_eq!(list_complete(&root).unwrap(), vec![1, 2, 3, 4]);
    let e = Retention::new(1, None).unwrap_err().to_string();
    assert!(e.contains("--keep-last 1") && e.contains("at least two"), "{e}");
}

#[test]
fn retention_never_counts_a_corrupt_checkpoint_and_never_deletes_the_resumed_one() {
    let root = tmpdir("ck_corrupt_keep");
    for s in 1..=5 {
        save(&root, s);
    }
    // 4 and 5 damaged (same sizes, bad checksums): the two good ones kept are 3 and 2
    for s in [4, 5] {
        let f = std::fs::read_dir(checkpoint_dir(&root, s)).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().ends_with("master.bin")).unwrap();
        let mut b = std::fs::read(&f).unwrap();
        b[3] ^= 1;
        std::fs::write(&f, b).unwrap();
    }
    let mut r = Retention::new(2, None).unwrap();
    let p = r.prune(&root).unwrap();
    assert_eq!(p.removed, vec![checkpoint_dir(&root, 1)]);
    assert_eq!(p.notes.len(), 2, "{:?}", p.notes);
    assert!(p.notes[0].contains("step_00000005") && p.notes[0].contains("not counted"), "{:?}", p.notes);
    assert_eq!(list_complete(&root).unwrap(), vec![2, 3, 4, 5]);
    // the checkpoint a run resumed from stays however old it is
    let root = tmpdir("ck_resumed_keep");
    for s in 1..=6 {
        save(&root, s);
    }
    let mut r = Retention::new(2, None).unwrap();
    r.resumed(2);
    r.written(6);
    r.prune(&root).unwrap();
    assert_eq!(list_complete(&root).unwrap(), vec![2, 5, 6]);
}

#[test]
fn the_manifest_is_checked_against_its_commit_record() {
    let root = tmpdir("ck_commit");
    let d = save(&root, 7);
    let m = d.join(MANIFEST);
    let text = std::fs::read_to_string(&m).unwrap();
    // an edit that keeps the JSON valid (and the sizes right): the step in the state
    let edited = text.replace("\"epoch\": 1", "\"epoch\": 2");
    assert_ne!(edited, text);
    std::fs::write(&m, &edited).unwrap();
    assert_file_err(load_checkpoint(&d), &m, &["does not match its commit record", "edited or damaged"]);
    assert_eq!(latest_complete(&root).unwrap(), None);
    std::fs::write(&m, &text).unwrap();
    load_checkpoint(&d).unwrap();
    // no commit record: the write never finished
    std::fs::remove_file(d.join(COMMIT)).unwrap();
    assert_file_err(load_checkpoint(&d), &d.join(COMMIT), &["incomplete checkpoint", "commit record"]);
    assert!(list_complete(&root).unwrap().is_empty());
}

#[test]
fn lineage_sets_aside_an_abandoned_branch_and_latest_follows_the_resumed_line() {
    let root = tmpdir("ck_lineage");
    let r1 = run("r1");
    for s in [5, 10, 15, 20] {
        save_in(&root, s, &r1);
    }
    // run r2 resumes from step 10 of r1: 15 and 20 are an abandoned branch
    let r2 = Lineage { run: "r2".into(), ancestry: vec![("r1".into(), 10)] };
    assert_eq!(r2, Lineage { run: r2.run.clone(), ..Lineage::resumed_from(&r1, 10) });
    let notes = llmq_io::retention::set_aside(&root, Some((&r1, 10)), false).unwrap();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes.iter().all(|n| n.contains("abandoned branch")), "{notes:?}");
    assert_eq!(list_complete(&root).unwrap(), vec![5, 10]);
    let kept = root.join("abandoned/r1/step_00000020");
    assert_eq!(verify_checkpoint(&kept).unwrap(), 20, "set aside, not deleted");
    save_in(&root, 12, &r2);
    assert_eq!(latest_complete(&root).unwrap().unwrap().0, 12);
    assert_eq!(load_checkpoint(&checkpoint_dir(&root, 12)).unwrap().lineage, r2);
    // r3 resumes from r2's 12: everything in the root is on its line
    assert!(llmq_io::retention::set_aside(&root, Some((&r2, 12)), false).unwrap().is_empty());
    assert!(r2.contains(12, "r1", 5) && !r2.contains(12, "r1", 15) && !r2.contains(12, "r9", 1));
    // a fresh run sets everything aside; with `delete` it is removed instead
    save_in(&root, 15, &run("other"));
    let notes = llmq_io::retention::set_aside(&root, Some((&r2, 12)), true).unwrap();
    assert!(notes.len() == 1 && notes[0].contains("deleted step_00000015") && notes[0].contains("not on the resumed"), "{notes:?}");
    let notes = llmq_io::retention::set_aside(&root, None, false).unwrap();
    assert_eq!(notes.len(), 3, "{notes:?}");
    assert!(list_complete(&root).unwrap().is_empty());
    assert!(root.join("abandoned/r2/step_00000012").is_dir() && root.join("abandoned/r1/step_00000010").is_dir());
}
