mod common;
use common::*;
use llmq_io::data::{Batch, BatchSource};
use llmq_io::loader::*;
use llmq_io::tokfile::write_token_file;
use std::collections::BTreeSet;
use std::path::PathBuf;

/// Files whose tokens encode (file, position): file f token i = f * 10000 + i.
fn make_files(dir: &std::path::Path, sizes: &[usize]) -> Vec<PathBuf> {
    sizes
        .iter()
        .enumerate()
        .map(|(f, &n)| {
            let p = dir.join(format!("data_{f:03}.bin"));
            let toks: Vec<i32> = (0..n).map(|i| (f * 10000 + i) as i32).collect();
            write_token_file(&p, &toks, None, Some(100000)).unwrap();
            p
        })
        .collect()
}

/// The chunk (file, start) a row of a batch came from, checking the window is consistent.
fn rows(b: &Batch, t: usize) -> Vec<(i32, i32)> {
    b.inputs
        .chunks(t)
        .zip(b.targets.chunks(t))
        .map(|(inp, tgt)| {
            for j in 0..t {
                assert_eq!(inp[j], inp[0] + j as i32, "inputs contiguous");
                assert_eq!(tgt[j], inp[j] + 1, "targets shifted by one");
            }
            (inp[0] / 10000, inp[0] % 10000)
        })
        .collect()
}

#[test]
fn windows_and_targets_in_order() {
    let d = tmpdir("ld_windows");
    let files = make_files(&d, &[23, 9]);
    let t = 4;
    let mut l = TokenLoader::eval(&files, t, 0, 1, None).unwrap();
    // (23 - 1) / 4 = 5 chunks, (9 - 1) / 4 = 2 chunks
    assert_eq!(l.total_chunks(), 7);
    assert_eq!(l.chunks_per_epoch(), 7);
    assert_eq!(l.total_tokens(), 32);
    let b = l.next_batch(7, t).unwrap();
    assert_eq!(b.inputs.len(), 28);
    assert_eq!(&b.inputs[..4], &[0, 1, 2, 3]);
    assert_eq!(&b.targets[..4], &[1, 2, 3, 4]);
    assert_eq!(rows(&b, t), vec![(0, 0), (0, 4), (0, 8), (0, 12), (0, 16), (1, 0), (1, 4)]);
    // chunk 4 of file 0 uses tokens 16..21 (target 20 = last needed); tokens 21, 22 are dropped
    assert_eq!(b.targets[4 * 4 + 3], 20);
    assert_eq!(l.epoch(), 1.0);
    // wraps into the next epoch, same order without shuffling
    let b2 = l.next_batch(2, t).unwrap();
    assert_eq!(rows(&b2, t), vec![(0, 0), (0, 4)]);
    assert_eq!(l.position(), (1, 2));
    l.reset();
    assert_eq!(l.next_batch(7, t).unwrap(), b);
    assert!(l.describe().contains("2 token file(s), 32 tokens, 7 chunks of 4 tokens"), "{}", l.describe());
    assert!(l.describe().contains("data_000.bin (23 tokens)"));
    // a different T is refused
    assert_err_contains(l.next_batch(1, 5), &["built for sequences of 4", "asked for 5"]);
}

#[test]
fn masked_targets_become_minus_100() {
    let d = tmpdir("ld_mask");
    let p = d.join("m.bin");
    let toks: Vec<i32> = (0..17).collect();
    let mask: Vec<bool> = (0..17).map(|i| !(3..7).contains(&i) && i != 12).collect();
    write_token_file(&p, &toks, Some(&mask), Some(100)).unwrap();
    let mut l = TokenLoader::eval(&[p], 4, 0, 1, None).unwrap();
    let b = l.next_batch(4, 4).unwrap();
    assert_eq!(b.inputs, (0..16).collect::<Vec<i32>>());
    let want: Vec<i32> = (1..17).map(|i| if mask[i as usize] { i } else { -100 }).collect();
    assert_eq!(b.targets, want);
    assert_eq!(b.valid_targets(), 16 - 5);
}

#[test]
fn shuffle_covers_every_chunk_once_per_epoch_and_is_seeded() {
    let d = tmpdir("ld_shuffle");
    let files = make_files(&d, &[41, 81, 1, 25]);
    let t = 8;
    let mut l = TokenLoader::new(&files, LoaderOptions::train(t, 7)).unwrap();
    let n = l.chunks_per_epoch() as usize;
    assert_eq!(n, 5 + 10 + 3); // the 1-token file has no chunk
    let all: BTreeSet<(i32, i32)> = rows(&l.clone_fresh().next_batch(n, t).unwrap(), t).into_iter().collect();
    assert_eq!(all.len(), n);
    let e0 = rows(&l.next_batch(n, t).unwrap(), t);
    let e1 = rows(&l.next_batch(n, t).unwrap(), t);
    assert_eq!(e0.iter().copied().collect::<BTreeSet<_>>(), all);
    assert_eq!(e1.iter().copied().collect::<BTreeSet<_>>(), all);
    assert_ne!(e0, e1, "epochs are shuffled differently");
    // within an epoch, each file's chunks are contiguous (file-local reading)
    let files_seq: Vec<i32> = e0.iter().map(|r| r.0).collect();
    let mut seen = Vec::new();
    for f in files_seq {
        if seen.last() != Some(&f) {
            assert!(!seen.contains(&f), "file {f} visited twice in one epoch");
            seen.push(f);
        }
    }
    // same seed, same stream; other seed, other stream
    let mut a = TokenLoader::new(&files, LoaderOptions::train(t, 7)).unwrap();
    let mut b = TokenLoader::new(&files, LoaderOptions::train(t, 8)).unwrap();
    assert_eq!(rows(&a.next_batch(n, t).unwrap(), t), e0);
    assert_ne!(rows(&b.next_batch(n, t).unwrap(), t), e0);
}

trait Fresh {
    fn clone_fresh(&self) -> TokenLoader;
}
impl Fresh for TokenLoader {
    fn clone_fresh(&self) -> TokenLoader {
        let files: Vec<PathBuf> = self.files().iter().map(|f| f.path.clone()).collect();
        TokenLoader::new(&files, LoaderOptions { shuffle: false, ..self.options().clone() }).unwrap()
    }
}

#[test]
fn rank_striding_partitions_the_epoch() {
    let d = tmpdir("ld_ranks");
    let files = make_files(&d, &[49, 33, 17]); // 6 + 4 + 2 = 12 chunks of 8
    let t = 8;
    let w = 3;
    let mut single = TokenLoader::new(&files, LoaderOptions::train(t, 99)).unwrap();
    assert_eq!(single.chunks_per_epoch(), 12);
    let perm0 = rows(&single.next_batch(12, t).unwrap(), t);
    let perm1 = rows(&single.next_batch(12, t).unwrap(), t);
    let mut union = BTreeSet::new();
    for r in 0..w {
        let mut l = TokenLoader::new(&files, LoaderOptions { rank: r, world_size: w, ..LoaderOptions::train(t, 99) }).unwrap();
        assert_eq!(l.chunks_per_epoch(), 4);
        // two epochs in batches of 3 (crossing the boundary inside a batch)
        let mut got = Vec::new();
        for _ in 0..3 {
            let b = l.next_batch(3, t).unwrap();
            got.extend(rows(&b, t));
        }
        let want: Vec<_> = (0..4).map(|i| perm0[r + i * w]).chain((0..4).map(|i| perm1[r + i * w])).collect();
        assert_eq!(&got[..8], &want[..], "rank {r} takes r, r+W, ... of the epoch permutation");
        for x in &got[..4] {
            assert!(union.insert(*x), "chunk {x:?} taken by two ranks");
        }
    }
    assert_eq!(union.len(), 12);
    // uneven split: 13 chunks over 3 ranks -> 4 each, the rest skipped
    let files2 = make_files(&tmpdir("ld_ranks2"), &[105]);
    let l = TokenLoader::new(&files2, LoaderOptions { rank: 2, world_size: 3, ..LoaderOptions::train(8, 1) }).unwrap();
    assert_eq!((l.total_chunks(), l.chunks_per_epoch()), (13, 4));
    assert!(TokenLoader::new(&files2, LoaderOptions { rank: 3, world_size: 3, ..LoaderOptions::train(8, 1) }).is_err());
}

#[test]
fn restore_continues_bitwise_identically() {
    let d = tmpdir("ld_restore");
    let files = make_files(&d, &[57, 130, 23, 90]);
    let t = 6;
    for world in [1usize, 2] {
        let opts = LoaderOptions { rank: world - 1, world_size: world, ..LoaderOptions::train(t, 1234) };
        let mut l = TokenLoader::new(&files, opts.clone()).unwrap();
        let per = l.chunks_per_epoch();
        // save at many positions, including mid-epoch in later files and at the epoch boundary
        let mut saved = Vec::new();
        let mut stream = Vec::new();
        for _ in 0..(3 * per as usize / 5 + 4) {
            saved.push(l.state());
            stream.push(l.next_batch(5, t).unwrap());
        }
        assert!(l.epoch() > 2.0, "the stream crossed two epoch boundaries");
        for (k, s) in saved.iter().enumerate() {
            // a fresh loader with a different seed: restore adopts the saved one
            let mut r = TokenLoader::new(&files, LoaderOptions { seed: 1, ..opts.clone() }).unwrap();
            r.restore(s).unwrap();
            assert_eq!(&r.state(), s);
            for (j, want) in stream[k..].iter().enumerate().take(6) {
                assert_eq!(&r.next_batch(5, t).unwrap(), want, "world {world}: restored at batch {k}, batch {j} differs");
            }
        }
        // the state is JSON that survives a text round trip
        let text = serde_json::to_string(&saved[7]).unwrap();
        let mut r = TokenLoader::new(&files, opts.clone()).unwrap();
        r.restore(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(r.next_batch(5, t).unwrap(), stream[7]);
        // the state of one rank restores another rank at the same position
        if world == 2 {
            let mut r0 = TokenLoader::new(&files, LoaderOptions { rank: 0, ..opts.clone() }).unwrap();
            let mut ref0 = TokenLoader::new(&files, LoaderOptions { rank: 0, ..opts.clone() }).unwrap();
            for _ in 0..7 {
                ref0.next_batch(5, t).unwrap();
            }
            r0.restore(&saved[7]).unwrap();
            assert_eq!(r0.next_batch(5, t).unwrap(), ref0.next_batch(5, t).unwrap());
        }
    }
}

#[test]
fn restore_refuses_a_different_file_of_the_same_name_and_size() {
    let d = tmpdir("ld_fingerprint");
    let f = d.join("data.bin");
    let toks: Vec<i32> = (0..500).map(|i| i % 200).collect();
    llmq_io::tokfile::write_token_file(&f, &toks, None, Some(256)).unwrap();
    let s = TokenLoader::new(std::slice::from_ref(&f), LoaderOptions::train(8, 3)).unwrap().state();
    // the same name and size, one token different
    let mut other = toks.clone();
    other[250] = 7;
    llmq_io::tokfile::write_token_file(&f, &other, None, Some(256)).unwrap();
    let mut l = TokenLoader::new(std::slice::from_ref(&f), LoaderOptions::train(8, 3)).unwrap();
    assert_err_contains(l.restore(&s), &["data.bin", "fingerprint", "--allow-data-change"]);
    let mut l = TokenLoader::new(std::slice::from_ref(&f), LoaderOptions { allow_data_change: true, ..LoaderOptions::train(8, 3) }).unwrap();
    l.restore(&s).unwrap();
    // a large file is sampled, not read whole: a change inside a sampled block is seen
    let big: Vec<i32> = (0..3_000_000).map(|i| i % 251).collect();
    llmq_io::tokfile::write_token_file(&f, &big, None, Some(256)).unwrap();
    let a = llmq_io::tokfile::fingerprint(&f).unwrap();
    let mut changed = big.clone();
    changed[100] = 0;
    llmq_io::tokfile::write_token_file(&f, &changed, None, Some(256)).unwrap();
    assert_ne!(a, llmq_io::tokfile::fingerprint(&f).unwrap());
}

#[test]
fn restore_refuses_changed_data_or_shape() {
    let d = tmpdir("ld_restore_bad");
    let files = make_files(&d, &[57, 130]);
    let mut l = TokenLoader::new(&files, LoaderOptions::train(6, 5)).unwrap();
    l.next_batch(3, 6).unwrap();
    let s = l.state();
    let mut other_t = TokenLoader::new(&files, LoaderOptions::train(8, 5)).unwrap();
    assert_err_contains(other_t.restore(&s), &["seq_len", "6", "8"]);
    // 3 chunks into the epoch: 2 ranks cannot continue from there exactly
    let mut other_w = TokenLoader::new(&files, LoaderOptions { world_size: 2, ..LoaderOptions::train(6, 5) }).unwrap();
    assert_err_contains(other_w.restore(&s), &["world_size", "chunk 3", "multiple of 2"]);
    let mut fewer = TokenLoader::new(&files[..1], LoaderOptions::train(6, 5)).unwrap();
    assert_err_contains(fewer.restore(&s), &["files", "2 files"]);
    // a file rewritten with other content length
    write_token_file(&files[1], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], None, Some(100000)).unwrap();
    let mut changed = TokenLoader::new(&files, LoaderOptions::train(6, 5)).unwrap();
    assert_err_contains(changed.restore(&s), &["data_001.bin", "n_tokens", "130"]);
    assert_err_contains(changed.restore(&serde_json::json!({"kind": "synthetic"})), &["kind"]);
}

#[test]
fn vocab_limit_checked_on_read_and_globbing() {
    let d = tmpdir("ld_vocab");
    let files = make_files(&d, &[30, 30]); // file 1 holds ids 10000..10029
    let mut l = TokenLoader::eval(&files, 4, 0, 1, Some(10005)).unwrap();
    l.next_batch(7, 4).unwrap(); // file 0 is fine
    assert_file_err(l.next_batch(2, 4), &files[1], &["outside the vocabulary 0..10005"]);

    let pat = format!("{}/data_*.bin", d.display());
    assert_eq!(expand_glob(&pat).unwrap(), files);
    let both = format!("{}/data_001.bin,{}/data_000.bin", d.display(), d.display());
    assert_eq!(expand_glob(&both).unwrap(), vec![files[1].clone(), files[0].clone()]);
    assert_err_contains(expand_glob(&format!("{}/nothing_*.bin", d.display())), &["matches no files"]);
    let l = TokenLoader::from_glob(&pat, LoaderOptions::train(4, 0)).unwrap();
    assert_eq!(l.total_chunks(), 14);
    // too little data for one chunk
    let small = make_files(&tmpdir("ld_small"), &[4]);
    let mut l = TokenLoader::eval(&small, 4, 0, 1, None).unwrap();
    assert_err_contains(l.next_batch(1, 4), &["not enough data"]);
}

#[test]
fn eval_batches_left() {
    let d = tmpdir("ld_eval");
    let files = make_files(&d, &[41]); // 10 chunks of 4
    let mut l = TokenLoader::eval(&files, 4, 1, 2, None).unwrap();
    assert_eq!(l.chunks_per_epoch(), 5);
    assert_eq!(l.batches_left_in_epoch(2), 2);
    let b = l.next_batch(2, 4).unwrap();
    assert_eq!(rows(&b, 4), vec![(0, 4), (0, 12)]);
    assert_eq!(l.batches_left_in_epoch(2), 1);
    let mut rng = Rng::new(3);
    let mut v: Vec<u32> = (0..100).collect();
    rng.shuffle(&mut v);
    assert_ne!(v, (0..100).collect::<Vec<u32>>());
    v.sort();
    assert_eq!(v, (0..100).collect::<Vec<u32>>());
    // fixed values: the PRNG never depends on a crate version
    assert_eq!(Rng::new(0).next_u64(), Rng::new(0).next_u64());
    let mut s = 0u64;
    assert_eq!(splitmix64(&mut s), 0xE220_A839_7B1D_CDAF);
}

#[test]
fn a_position_saved_by_some_ranks_continues_under_another_number_of_ranks() {
    let d = tmpdir("ld_restride");
    let files = make_files(&d, &[97, 130]); // 12 + 16 = 28 chunks of 8
    let t = 8;
    let mut single = TokenLoader::new(&files, LoaderOptions::train(t, 7)).unwrap();
    let perm = rows(&single.next_batch(28, t).unwrap(), t);
    // 2 ranks take 4 chunks each (positions 0..8 of the permutation), then 4 ranks continue
    let mut two = TokenLoader::new(&files, LoaderOptions { rank: 1, world_size: 2, ..LoaderOptions::train(t, 7) }).unwrap();
    two.next_batch(4, t).unwrap();
    let s = two.state();
    for (world, resumed_at) in [(4usize, 8usize), (1, 8), (2, 8)] {
        for r in 0..world {
            let mut l = TokenLoader::new(&files, LoaderOptions { rank: r, world_size: world, ..LoaderOptions::train(t, 7) }).unwrap();
            l.restore(&s).unwrap();
            let got = rows(&l.next_batch(2, t).unwrap(), t);
            let want: Vec<_> = (0..2).map(|i| perm[resumed_at + r + i * world]).collect();
            assert_eq!(got, want, "rank {r} of {world}");
        }
    }
    // 3 ranks cannot continue from position 8
    let mut three = TokenLoader::new(&files, LoaderOptions { world_size: 3, ..LoaderOptions::train(t, 7) }).unwrap();
    assert_err_contains(three.restore(&s), &["world_size", "chunk 8", "multiple of 3"]);
}
