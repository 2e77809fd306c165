mod common;
use common::*;
use llmq_core::{Arch, DType, ModelConfig, ParamKind, ParamLayout};
use llmq_io::hf::*;
use llmq_io::safetensors::*;
use std::collections::BTreeMap;
use std::path::Path;

fn cfg(arch: Arch, tied: bool) -> ModelConfig {
    let mut c = ModelConfig::tiny(arch, 16);
    c.hidden_size = 8;
    c.intermediate_size = 12;
    c.num_layers = 2;
    c.num_heads = 2;
    c.num_kv_heads = 1;
    c.head_dim = 4;
    c.tie_word_embeddings = tied;
    c
}

/// HF tensors of `c` with distinct values: tensor number k, element i -> k * 1000 + i
/// (exact in f32; small enough to be exact in bf16 for the first few tensors, not in general).
fn hf_tensors(c: &ModelConfig) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let (cc, d, hd, v) = (c.hidden_size, c.intermediate_size, c.head_dim, c.vocab_size);
    let (q, kv) = (c.num_heads * hd, c.num_kv_heads * hd);
    let mut names: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![v, cc])];
    for l in 0..c.num_layers {
        let p = format!("model.layers.{l}.");
        names.push((format!("{p}input_layernorm.weight"), vec![cc]));
        names.push((format!("{p}self_attn.q_proj.weight"), vec![q, cc]));
        names.push((format!("{p}self_attn.k_proj.weight"), vec![kv, cc]));
        names.push((format!("{p}self_attn.v_proj.weight"), vec![kv, cc]));
        if c.qkv_bias {
            names.push((format!("{p}self_attn.q_proj.bias"), vec![q]));
            names.push((format!("{p}self_attn.k_proj.bias"), vec![kv]));
            names.push((format!("{p}self_attn.v_proj.bias"), vec![kv]));
        }
        if c.qk_norm {
            names.push((format!("{p}self_attn.q_norm.weight"), vec![hd]));
            names.push((format!("{p}self_attn.k_norm.weight"), vec![hd]));
        }
        names.push((format!("{p}self_attn.o_proj.weight"), vec![cc, q]));
        names.push((format!("{p}post_attention_layernorm.weight"), vec![cc]));
        names.push((format!("{p}mlp.gate_proj.weight"), vec![d, cc]));
        names.push((format!("{p}mlp.up_proj.weight"), vec![d, cc]));
        names.push((format!("{p}mlp.down_proj.weight"), vec![cc, d]));
    }
    names.push(("model.norm.weight".into(), vec![cc]));
    if !c.tie_word_embeddings {
        names.push(("lm_head.weight".into(), vec![v, cc]));
    }
    names
        .into_iter()
        .enumerate()
        .map(|(k, (n, s))| {
            let numel: usize = s.iter().product();
            let vals = (0..numel).map(|i| ((k + 1) * 1000 + i) as f32).collect();
            (n, (s, vals))
        })
        .collect()
}

fn write_hf(path: &Path, t: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, dtype: StDtype) {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = t
        .iter()
        .map(|(n, (s, v))| {
            let mut b = Vec::new();
            encode_from_f32(dtype, v, &mut b).unwrap();
            (n.clone(), s.clone(), b)
        })
        .collect();
    let views: Vec<TensorView> =
        bytes.iter().map(|(n, s, b)| TensorView { name: n.clone(), dtype, shape: s.clone(), data: b }).collect();
    write_safetensors(path, &views, None).unwrap();
}

fn write_config(dir: &Path, c: &ModelConfig) {
    std::fs::write(dir.join("config.json"), serde_json::to_string(&c.to_hf_json("float32")).unwrap()).unwrap();
}

/// Checks every layout entry against the HF tensors, computing the fused order independently.
fn check_groups(c: &ModelConfig, t: &BTreeMap<String, (Vec<usize>, Vec<f32>)>, groups: &[Vec<f32>]) {
    let layout = ParamLayout::new(c);
    assert_eq!(groups.len(), layout.groups.len());
    let get = |n: &str| t[n].1.clone();
    for (gi, g) in layout.groups.iter().enumerate() {
        assert_eq!(groups[gi].len(), g.numel, "group {}", g.name);
        let mut covered = vec![false; g.numel];
        for e in &g.entries {
            let pre = format!("model.layers.{}.", gi.wrapping_sub(1));
            let want: Vec<f32> = match e.kind {
                ParamKind::Embedding => get("model.embed_tokens.weight"),
                ParamKind::FinalNorm => get("model.norm.weight"),
                ParamKind::LmHead => get("lm_head.weight"),
                ParamKind::Ln1 => get(&format!("{pre}input_layernorm.weight")),
                ParamKind::Ln2 => get(&format!("{pre}post_attention_layernorm.weight")),
                ParamKind::QNorm => get(&format!("{pre}self_attn.q_norm.weight")),
                ParamKind::KNorm => get(&format!("{pre}self_attn.k_norm.weight")),
                ParamKind::OutW => get(&format!("{pre}self_attn.o_proj.weight")),
                ParamKind::DownW => get(&format!("{pre}mlp.down_proj.weight")),
                ParamKind::QkvW => ["q", "k", "v"].iter().flat_map(|x| get(&format!("{pre}self_attn.{x}_proj.weight"))).collect(),
                ParamKind::QkvB => ["q", "k", "v"].iter().flat_map(|x| get(&format!("{pre}self_attn.{x}_proj.bias"))).collect(),
                ParamKind::UpGateW => {
                    let mut v = get(&format!("{pre}mlp.up_proj.weight"));
                    v.extend(get(&format!("{pre}mlp.gate_proj.weight")));
                    v
                }
            };
            assert_eq!(want.len(), e.numel());
            assert_eq!(&groups[gi][e.offset..e.offset + e.numel()], &want[..], "{} {:?}", g.name, e.kind);
            covered[e.offset..e.offset + e.numel()].iter_mut().for_each(|c| *c = true);
        }
        for (i, c) in covered.iter().enumerate() {
            if !c {
                assert_eq!(groups[gi][i], 0.0, "padding of {} at {i}", g.name);
            }
        }
    }
}

#[test]
fn import_all_archs_and_export_round_trip() {
    for (arch, tied) in [(Arch::Qwen2, true), (Arch::Qwen2, false), (Arch::Qwen3, false), (Arch::Qwen3, true), (Arch::Llama, false), (Arch::Llama, true)] {
        let c = cfg(arch, tied);
        let d = tmpdir("hf_import");
        let t = hf_tensors(&c);
        write_hf(&d.join("model.safetensors"), &t, StDtype::F32);
        write_config(&d, &c);
        assert_eq!(load_config(&d).unwrap(), c);
        let groups = load_weights(&d, &c).unwrap();
        check_groups(&c, &t, &groups);

        // export in f32, with tokenizer files copied, and reload
        std::fs::write(d.join("tokenizer.json"), b"{\"tok\": 1}").unwrap();
        std::fs::write(d.join("merges.txt"), b"a b").unwrap();
        let out = d.join("export");
        export_model(&out, &c, &groups, DType::F32, Some(&d)).unwrap();
        assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), b"{\"tok\": 1}");
        assert_eq!(std::fs::read(out.join("merges.txt")).unwrap(), b"a b");
        assert!(!out.join("vocab.json").exists());
        assert_eq!(load_config(&out).unwrap(), c);
        let f = SafeTensorsFile::open(&out.join("model.safetensors")).unwrap();
        assert_eq!(f.metadata().get("format").map(|s| s.as_str()), Some("pt"));
        let names: Vec<&str> = f.names().collect();
        let want: Vec<&str> = t.keys().map(|s| s.as_str()).collect();
        assert_eq!(names, want, "{arch:?} tied={tied}: exported names");
        for (n, (s, v)) in &t {
            assert_eq!(&f.info(n).unwrap().shape, s);
            assert_eq!(&f.read_f32(n).unwrap(), v, "{n}");
        }
        let again = load_weights(&out, &c).unwrap();
        assert_eq!(again, groups);

        // bf16 export: values rounded through bf16
        let out16 = d.join("export16");
        export_model(&out16, &c, &groups, DType::BF16, None).unwrap();
        assert!(!out16.join("tokenizer.json").exists());
        let cfg_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out16.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg_json["torch_dtype"], "bfloat16");
        let g16 = load_weights(&out16, &c).unwrap();
        for (a, b) in g16.iter().zip(&groups) {
            for (x, y) in a.iter().zip(b) {
                assert_eq!(*x, llmq_core::dtype::round_through(DType::BF16, *y));
            }
        }
    }
}

#[test]
fn bf16_and_f16_sources_convert() {
    let c = cfg(Arch::Qwen2, true);
    let d = tmpdir("hf_bf16");
    let mut t = hf_tensors(&c);
    // values exact in bf16 and f16
    for (_, v) in t.values_mut() {
        for (i, x) in v.iter_mut().enumerate() {
            *x = (i % 64) as f32 * 0.25 - 4.0;
        }
    }
    write_hf(&d.join("model.safetensors"), &t, StDtype::BF16);
    check_groups(&c, &t, &load_weights(&d, &c).unwrap());
    write_hf(&d.join("model.safetensors"), &t, StDtype::F16);
    check_groups(&c, &t, &load_weights(&d, &c).unwrap());
}

#[test]
fn tied_lm_head_present_is_ignored() {
    let c = cfg(Arch::Qwen2, true);
    let d = tmpdir("hf_tied_head");
    let mut t = hf_tensors(&c);
    t.insert("lm_head.weight".into(), (vec![16, 8], vec![7.0; 128]));
    t.insert("model.layers.0.self_attn.rotary_emb.inv_freq".into(), (vec![2], vec![1.0, 0.5]));
    write_hf(&d.join("model.safetensors"), &t, StDtype::F32);
    let groups = load_weights(&d, &c).unwrap();
    t.remove("lm_head.weight");
    check_groups(&c, &t, &groups);
    // but a tied lm_head of the wrong shape is an error
    let mut t2 = hf_tensors(&c);
    t2.insert("lm_head.weight".into(), (vec![16, 4], vec![7.0; 64]));
    write_hf(&d.join("model.safetensors"), &t2, StDtype::F32);
    assert_err_contains(load_weights(&d, &c), &["lm_head.weight", "[16, 8]", "[16, 4]"]);
}

#[test]
fn missing_unexpected_and_misshapen_tensors_are_named() {
    let c = cfg(Arch::Qwen2, false);
    let d = tmpdir("hf_errors");
    let p = d.join("model.safetensors");

    let mut t = hf_tensors(&c);
    t.remove("model.layers.1.self_attn.k_proj.weight");
    write_hf(&p, &t, StDtype::F32);
    assert_err_contains(load_weights(&d, &c), &["missing tensor `model.layers.1.self_attn.k_proj.weight`", "[4, 8]"]);

    let mut t = hf_tensors(&c);
    t.remove("lm_head.weight");
    write_hf(&p, &t, StDtype::F32);
    assert_err_contains(load_weights(&d, &c), &["missing tensor `lm_head.weight`"]);

    let mut t = hf_tensors(&c);
    t.insert("model.layers.0.mlp.extra.weight".into(), (vec![2], vec![0.0; 2]));
    write_hf(&p, &t, StDtype::F32);
    assert_err_contains(load_weights(&d, &c), &["unexpected tensor `model.layers.0.mlp.extra.weight`"]);

    // a Qwen3 checkpoint loaded with a Qwen2 config: q_norm is unexpected
    let t = hf_tensors(&cfg(Arch::Qwen3, false));
    write_hf(&p, &t, StDtype::F32);
    assert_err_contains(load_weights(&d, &c), &["q_proj.bias"]);
    // and a qwen2 checkpoint with a qwen3 config names the unexpected bias
    let c3 = cfg(Arch::Qwen3, false);
    let mut t = hf_tensors(&c);
    t.insert("model.layers.0.self_attn.q_norm.weight".into(), (vec![4], vec![1.0; 4]));
    t.insert("model.layers.0.self_attn.k_norm.weight".into(), (vec![4], vec![1.0; 4]));
    t.insert("model.layers.1.self_attn.q_norm.weight".into(), (vec![4], vec![1.0; 4]));
    t.insert("model.layers.1.self_attn.k_norm.weight".into(), (vec![4], vec![1.0; 4]));
    write_hf(&p, &t, StDtype::F32);
    assert_err_contains(load_weights(&d, &c3), &["unexpected tensor `model.layers.0.self_attn.k_proj.bias`"]);

    let mut t = hf_tensors(&c);
    t.insert("model.layers.0.mlp.up_proj.weight".into(), (vec![12, 7], vec![0.0; 84]));
    write_hf(&p, &t, StDtype::F32);
    assert_file_err(load_weights(&d, &c), &p, &["model.layers.0.mlp.up_proj.weight", "expected shape [12, 8]", "got [12, 7]"]);

    // no weights at all
    let e = tmpdir("hf_empty");
    assert_file_err(load_weights(&e, &c), &e, &["model.safetensors"]);
}

#[test]
fn sharded_index() {
    let c = cfg(Arch::Llama, false);
    let d = tmpdir("hf_sharded");
    let t = hf_tensors(&c);
    let (a, b): (BTreeMap<_, _>, BTreeMap<_, _>) = t.clone().into_iter().enumerate().partition(|(i, _)| i % 2 == 0);
    let a: BTreeMap<_, _> = a.into_values().collect();
    let b: BTreeMap<_, _> = b.into_values().collect();
    write_hf(&d.join("model-00001-of-00002.safetensors"), &a, StDtype::F32);
    write_hf(&d.join("model-00002-of-00002.safetensors"), &b, StDtype::BF16);
    let mut wm = serde_json::Map::new();
    for n in a.keys() {
        wm.insert(n.clone(), "model-00001-of-00002.safetensors".into());
    }
    for n in b.keys() {
        wm.insert(n.clone(), "model-00002-of-00002.safetensors".into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": wm});
    let ip = d.join("model.safetensors.index.json");
    std::fs::write(&ip, serde_json::to_string(&index).unwrap()).unwrap();
    let groups = load_weights(&d, &c).unwrap();
    // shard b went through bf16
    let mut t_r = t.clone();
    for (n, (_, v)) in t_r.iter_mut() {
        if b.contains_key(n) {
            v.iter_mut().for_each(|x| *x = llmq_core::dtype::round_through(DType::BF16, *x));
        }
    }
    check_groups(&c, &t_r, &groups);

    // an index naming a file that does not exist
    let mut bad = index.clone();
    bad["weight_map"]["model.norm.weight"] = "model-00003-of-00002.safetensors".into();
    std::fs::write(&ip, serde_json::to_string(&bad).unwrap()).unwrap();
    assert_file_err(load_weights(&d, &c), &ip, &["model.norm.weight", "model-00003-of-00002.safetensors", "does not exist"]);

    // an index assigning a tensor to the wrong shard
    let wrong_name = a.keys().next().unwrap().clone();
    let mut bad = index.clone();
    bad["weight_map"][&wrong_name] = "model-00002-of-00002.safetensors".into();
    std::fs::write(&ip, serde_json::to_string(&bad).unwrap()).unwrap();
    assert_file_err(load_weights(&d, &c), &ip, &[&wrong_name, "does not hold it"]);

    // path traversal in the index
    let mut bad = index.clone();
    bad["weight_map"][&wrong_name] = "../x.safetensors".into();
    std::fs::write(&ip, serde_json::to_string(&bad).unwrap()).unwrap();
    assert_file_err(load_weights(&d, &c), &ip, &["plain name"]);

    // a shard holding a tensor the index does not list
    let mut bad = index.clone();
    bad["weight_map"].as_object_mut().unwrap().remove(&wrong_name);
    std::fs::write(&ip, serde_json::to_string(&bad).unwrap()).unwrap();
    let r = load_weights(&d, &c);
    assert_file_err(r, &d.join("model-00001-of-00002.safetensors"), &[&wrong_name, "does not list"]);
}

#[test]
fn resolve_names_in_the_cache() {
    let hub = tmpdir("hf_hub");
    let m = hub.join("models--Org--Tiny-1B");
    std::fs::create_dir_all(m.join("snapshots/aaa")).unwrap();
    std::fs::create_dir_all(m.join("snapshots/bbb")).unwrap();
    std::fs::create_dir_all(m.join("refs")).unwrap();
    std::fs::write(m.join("refs/main"), "aaa\n").unwrap();
    assert_eq!(resolve_model_dir_in("Org/Tiny-1B", std::slice::from_ref(&hub)).unwrap(), m.join("snapshots/aaa"));
    // refs/main pointing nowhere: the newest snapshot
    std::fs::write(m.join("refs/main"), "zzz").unwrap();
    let got = resolve_model_dir_in("Org/Tiny-1B", std::slice::from_ref(&hub)).unwrap();
    assert!(got == m.join("snapshots/aaa") || got == m.join("snapshots/bbb"));
    std::fs::remove_dir_all(m.join("snapshots/aaa")).unwrap();
    assert_eq!(resolve_model_dir_in("Org/Tiny-1B", std::slice::from_ref(&hub)).unwrap(), m.join("snapshots/bbb"));
    // a directory argument is used as is
    let dir = hub.join("models--Org--Tiny-1B");
    assert_eq!(resolve_model_dir_in(dir.to_str().unwrap(), &[]).unwrap(), dir);
    // not found: the error lists where it looked
    let msg = assert_err_contains(resolve_model_dir_in("Org/Missing", std::slice::from_ref(&hub)), &["Org/Missing", "models--Org--Missing", "never downloads"]);
    assert!(msg.contains(hub.to_str().unwrap()));
    assert_err_contains(resolve_model_dir_in("no-such-thing", std::slice::from_ref(&hub)), &["no-such-thing", "not an Org/Name"]);
}
