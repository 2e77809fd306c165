//! `attention_decode` (attention of new rows against a key/value cache) against the full causal
//! `attention_fwd`: feeding a sequence through the cache in pieces reproduces the full forward's
//! rows, and the op writes exactly the cache positions of the new rows.

mod common;

use common::{Ctx, Rng};
use llmq_core::{AttnShape, Backend, DType};

/// Rows pos..pos+t of every sequence of a [B*T, w] row-major matrix, as [B*t, w].
fn rows_of(v: &[f32], b: usize, t_all: usize, w: usize, pos: usize, t: usize) -> Vec<f32> {
    (0..b).flat_map(|bi| v[(bi * t_all + pos) * w..(bi * t_all + pos + t) * w].to_vec()).collect()
}

/// Runs the sequence through the cache in pieces of the given lengths; returns the output rows in
/// [B*T, Hq*Hd] order and the final caches.
fn decode_in_pieces(cx: &mut Ctx, qkv: &[f32], full: AttnShape, pieces: &[usize], dt: DType, cache_len: usize) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let (b, ow, q, kv) = (full.b, full.out_width(), full.qkv_width(), full.hkv * full.hd);
    let kc = cx.t(dt, &[b, cache_len, kv], &vec![7.0; b * cache_len * kv]);
    let vc = cx.t(dt, &[b, cache_len, kv], &vec![-7.0; b * cache_len * kv]);
    let mut out = vec![0f32; full.n() * ow];
    let mut pos = 0;
    for &t in pieces {
        let s = AttnShape { t, ..full };
        let x = cx.t(dt, &[s.n(), q], &rows_of(qkv, b, full.t, q, pos, t));
        let o = cx.zeros(dt, &[s.n(), ow]);
        cx.be.attention_decode(&o, &x, &kc, &vc, pos, s).unwrap();
        let got = cx.get(&o);
        for bi in 0..b {
            out[(bi * full.t + pos) * ow..(bi * full.t + pos + t) * ow].copy_from_slice(&got[bi * t * ow..(bi + 1) * t * ow]);
        }
        pos += t;
    }
    (out, cx.get(&kc), cx.get(&vc))
}

#[test]
fn decoding_in_pieces_reproduces_the_full_forward() {
    // GQA (3 query heads per kv head), two sequences; f32 and bf16 tensors and caches
    let full = AttnShape { b: 2, t: 13, hq: 6, hkv: 2, hd: 8 };
    for dt in [DType::F32, DType::BF16] {
        let mut cx = Ctx::new();
        let mut rng = Rng::new(21);
        let qkv = rng.vec(full.n() * full.qkv_width(), 2.0);
        let x = cx.t(dt, &[full.n(), full.qkv_width()], &qkv);
        let o = cx.zeros(dt, &[full.n(), full.out_width()]);
        let lse = cx.zeros(DType::F32, &[full.b, full.hq, full.t]);
        cx.be.attention_fwd(&o, &lse, &x, full, None).unwrap();
        let want = cx.get(&o);
        let qkv = cx.get(&x); // as stored (bf16-rounded)
        // one token at a time, a prompt then single tokens, uneven chunks, all at once
        for pieces in [vec![1; 13], vec![5, 1, 1, 1, 1, 1, 1, 1, 1], vec![4, 3, 6], vec![13]] {
            let (got, kc, vc) = decode_in_pieces(&mut cx, &qkv, full, &pieces, dt, 16);
            // the same per-query loop as attention_fwd over the same values: the same bits
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(g.to_bits(), w.to_bits(), "{dt} pieces {pieces:?}: out[{i}] = {g}, attention_fwd gives {w}");
            }
            // the cache holds every row's keys and values; positions past the sequence untouched
            let (q, kvw) = (full.qkv_width(), full.hkv * full.hd);
            for bi in 0..full.b {
                for p in 0..16 {
                    for c in 0..kvw {
                        let at = (bi * 16 + p) * kvw + c;
                        let (k_want, v_want) = if p < full.t {
                            let row = (bi * full.t + p) * q;
                            (qkv[row + full.hq * full.hd + c], qkv[row + (full.hq + full.hkv) * full.hd + c])
                        } else {
                            (7.0, -7.0)
                        };
                        assert_eq!((kc[at], vc[at]), (k_want, v_want), "{dt} pieces {pieces:?}: cache of sequence {bi} at position {p}, column {c}");
                    }
                }
            }
        }
    }
}

#[test]
fn bad_arguments_are_named() {
    let mut cx = Ctx::new();
    let s = AttnShape { b: 1, t: 2, hq: 4, hkv: 2, hd: 8 };
    let x = cx.zeros(DType::F32, &[s.n(), s.qkv_width()]);
    let o = cx.zeros(DType::F32, &[s.n(), s.out_width()]);
    let kc = cx.zeros(DType::F32, &[1, 5, 16]);
    let vc = cx.zeros(DType::F32, &[1, 5, 16]);
    let err = |r: llmq_core::Result<()>| r.unwrap_err().to_string();
    let e = err(cx.be.attention_decode(&o, &x, &kc, &vc, 4, s));
    assert!(e.contains("attention_decode") && e.contains("4..4+2") && e.contains("5 positions"), "{e}");
    let short = cx.zeros(DType::F32, &[1, 5, 8]);
    let e = err(cx.be.attention_decode(&o, &x, &kc, &short, 0, s));
    assert!(e.contains("v_cache") && e.contains("Hkv*Hd = 16"), "{e}");
    let bf = cx.zeros(DType::BF16, &[1, 5, 16]);
    let e = err(cx.be.attention_decode(&o, &x, &kc, &bf, 0, s));
    assert!(e.contains("dtypes differ"), "{e}");
    let e = err(cx.be.attention_decode(&o, &x, &kc, &vc, 0, AttnShape { hq: 3, ..s }));
    assert!(e.contains("multiple of Hkv"), "{e}");
    let e = err(cx.be.attention_decode(&o, &kc, &kc, &vc, 0, s));
    assert!(e.contains("qkv"), "{e}");
}
