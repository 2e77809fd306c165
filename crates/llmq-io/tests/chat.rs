//! `tokenize --chat`: chat templates and assistant-only loss masks, on a byte-level BPE tokenizer
//! shaped like Qwen's (every byte a token, no merges, so offsets are exact and any text decodes).
mod common;
use common::*;
use llmq_io::tokenize::*;
use llmq_io::tokfile::read_token_file;
use std::path::Path;
use tokenizers::Tokenizer;

const SPECIALS: &[&str] = &["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"];

/// GPT-2's byte-to-character table (bytes_to_unicode).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut extra = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                extra += 1;
                char::from_u32(255 + extra).unwrap()
            }
        })
        .collect()
}

pub fn write_byte_tokenizer(dir: &Path, config: serde_json::Value) {
    let mut vocab = serde_json::Map::new();
    for (i, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), i.into());
    }
    let added: Vec<serde_json::Value> = SPECIALS
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": 256 + i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// Qwen2.5's chat template (without its tool-definition preamble, which needs `tools`).
const QWEN25: &str = r#"{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"#;

/// Llama 3's chat template: BOS from the config, contents trimmed.
const LLAMA3: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";

/// The texts of the runs of trained (mask 1) tokens, decoded with their special tokens.
fn trained_runs(tok: &Tokenizer, ids: &[i32], mask: &[bool]) -> Vec<String> {
    let mut runs = Vec::new();
    let mut cur: Vec<u32> = Vec::new();
    for (&id, &m) in ids.iter().zip(mask) {
        if m {
            cur.push(id as u32);
        } else if !cur.is_empty() {
            runs.push(tok.decode(&cur, false).unwrap());
            cur.clear();
        }
    }
    if !cur.is_empty() {
        runs.push(tok.decode(&cur, false).unwrap());
    }
    runs
}

fn chat_opts(d: &Path, input: &Path) -> TokenizeOptions {
    let mut o = TokenizeOptions::new(vec![input.to_path_buf()], d.to_path_buf(), d.join("out"));
    o.chat = true;
    o.field = "messages".into();
    o.overwrite = true;
    o
}

#[test]
fn qwen_template_trains_exactly_the_assistant_replies() {
    let d = tmpdir("chat_qwen");
    write_byte_tokenizer(&d, serde_json::json!({"chat_template": QWEN25, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}));
    let conv1 = serde_json::json!({"id": 7, "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello, then: café?"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "And 2+2?"},
        {"role": "assistant", "content": " 4 — naïve 🙂\n"},
    ]});
    // no system message: the template adds its default one; the user repeats the reply's text
    let conv2 = serde_json::json!({"messages": [
        {"role": "user", "content": "Write OK"},
        {"role": "assistant", "content": "OK"},
    ]});
    let j = d.join("chat.jsonl");
    std::fs::write(&j, format!("{conv1}\n\n{conv2}\n")).unwrap();
    let rep = tokenize(&chat_opts(&d, &j), &mut |_| {}).unwrap();
    assert_eq!(rep.eos.token.as_deref(), Some("<|endoftext|>"));
    assert_eq!(rep.documents, 2);
    let data = read_token_file(&rep.files[0].path, None).unwrap();
    let mask = data.mask.clone().expect("chat token files have a loss mask");
    let tok = Tokenizer::from_file(d.join("tokenizer.json")).unwrap();
    let all: Vec<u32> = data.tokens.iter().map(|&t| t as u32).collect();
    let want1 = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hello, then: café?<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n<|im_start|>user\nAnd 2+2?<|im_end|>\n<|im_start|>assistant\n 4 — naïve 🙂\n<|im_end|>\n";
    let want2 = "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\nWrite OK<|im_end|>\n<|im_start|>assistant\nOK<|im_end|>\n";
    assert_eq!(tok.decode(&all, false).unwrap(), format!("{want1}<|endoftext|>{want2}<|endoftext|>"));
    assert_eq!(
        trained_runs(&tok, &data.tokens, &mask),
        ["hello<|im_end|>", " 4 — naïve 🙂\n<|im_end|>", "OK<|im_end|>"],
        "exactly the assistant contents and their end-of-turn tokens are trained"
    );
    assert_eq!(rep.chat.as_ref().unwrap().0, d.join("tokenizer_config.json"));
    assert_eq!(rep.chat.as_ref().unwrap().1, mask.iter().filter(|&&m| m).count() as u64);
    // the EOS between conversations is not trained
    let eos_at: Vec<usize> = (0..all.len()).filter(|&i| all[i] == 256).collect();
    assert_eq!(eos_at.len(), 2);
    assert!(eos_at.iter().all(|&i| !mask[i]));
}

#[test]
fn llama3_template_trims_and_adds_bos_once() {
    let d = tmpdir("chat_llama");
    write_byte_tokenizer(&d, serde_json::json!({"chat_template": LLAMA3, "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}));
    let j = d.join("c.jsonl");
    let conv = serde_json::json!({"messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "  Hello there.  "},
    ]});
    std::fs::write(&j, format!("{conv}\n")).unwrap();
    let mut o = chat_opts(&d, &j);
    o.eos_id = Some(256);
    let rep = tokenize(&o, &mut |_| {}).unwrap();
    let data = read_token_file(&rep.files[0].path, None).unwrap();
    let tok = Tokenizer::from_file(d.join("tokenizer.json")).unwrap();
    let all: Vec<u32> = data.tokens.iter().map(|&t| t as u32).collect();
    assert_eq!(
        tok.decode(&all, false).unwrap(),
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello there.<|eot_id|><|endoftext|>"
    );
    assert_eq!(trained_runs(&tok, &data.tokens, data.mask.as_ref().unwrap()), ["Hello there.<|eot_id|>"]);
}

/// A chat template is code from the model's directory: one that would loop for 10^10 steps stops
/// at its first conversation with an error naming it, while a real template renders a long
/// conversation within the same budget.
#[test]
fn a_runaway_template_stops_and_a_long_conversation_renders() {
    let d = tmpdir("chat_fuel");
    write_byte_tokenizer(&d, serde_json::json!({"chat_template": QWEN25, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}));
    let turns: Vec<serde_json::Value> = (0..2000).map(|i| serde_json::json!({"role": if i % 2 == 0 { "user" } else { "assistant" }, "content": format!("turn {i}")})).collect();
    let j = d.join("c.jsonl");
    std::fs::write(&j, format!("{}\n", serde_json::json!({"messages": turns}))).unwrap();
    let o = chat_opts(&d, &j);
    let rep = tokenize(&o, &mut |_| {}).unwrap();
    assert_eq!(rep.documents, 1);
    let cfg = d.join("tokenizer_config.json");
    let runaway = "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}";
    std::fs::write(&cfg, serde_json::json!({"chat_template": runaway}).to_string()).unwrap();
    let started = std::time::Instant::now();
    assert_file_err(tokenize(&o, &mut |_| {}), &j, &["line 1", "chat template of", "tokenizer_config.json", "ran out of fuel"]);
    assert!(started.elapsed().as_secs() < 10, "{:?}", started.elapsed());
}

#[test]
fn bad_conversations_name_file_line_and_field() {
    let d = tmpdir("chat_bad");
    let tmpl = "{% for m in messages %}{% if loop.index0 > 0 and m.role == messages[loop.index0 - 1].role %}{{ raise_exception('Conversation roles must alternate') }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
    write_byte_tokenizer(&d, serde_json::json!({"chat_template": tmpl}));
    let j = d.join("c.jsonl");
    let ok = r#"{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}"#;
    let o = chat_opts(&d, &j);
    let cases: &[(&str, &[&str])] = &[
        (r#"{"messages": []}"#, &["line 2", "field `messages` holds no messages"]),
        (r#"{"text": "x"}"#, &["line 2", "no field `messages`"]),
        (r#"{"messages": "hi"}"#, &["line 2", "field `messages`: expected an array"]),
        (r#"{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}"#, &["line 2", "field `messages[1].role`", "expected one of system, user, assistant, tool", "\"bot\""]),
        (r#"{"messages": [{"role": "user", "content": 3}]}"#, &["line 2", "field `messages[0].content`: expected a string"]),
        (r#"{"messages": [{"content": "a"}]}"#, &["line 2", "field `messages[0]`: no `role`"]),
        (r#"{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}"#, &["line 2", "field `messages`", "chat template of", "tokenizer_config.json", "Conversation roles must alternate"]),
    ];
    for (line, needles) in cases {
        std::fs::write(&j, format!("{ok}\n{line}\n")).unwrap();
        assert_file_err(tokenize(&o, &mut |_| {}), &j, needles);
    }
    // a template that does not print the reply verbatim cannot be masked
    let cfg = d.join("tokenizer_config.json");
    std::fs::write(&cfg, serde_json::json!({"chat_template": "{% for m in messages %}{{ m.role }}: {{ m.content | upper }}\n{% endfor %}"}).to_string()).unwrap();
    std::fs::write(&j, format!("{ok}\n")).unwrap();
    assert_file_err(tokenize(&o, &mut |_| {}), &j, &["line 1", "field `messages[1].content`", "verbatim"]);
    // a template that does not parse, and no template at all, name tokenizer_config.json
    std::fs::write(&cfg, r#"{"chat_template": "{% for m in messages %}"}"#).unwrap();
    assert_file_err(tokenize(&o, &mut |_| {}), &cfg, &["field `chat_template`", "cannot parse"]);
    std::fs::write(&cfg, r#"{"eos_token": "<|im_end|>"}"#).unwrap();
    assert_file_err(tokenize(&o, &mut |_| {}), &cfg, &["no field `chat_template`"]);
    // --chat takes no .txt input
    let t = d.join("a.txt");
    std::fs::write(&t, "x").unwrap();
    let mut o2 = o.clone();
    o2.inputs = vec![t.clone()];
    assert_file_err(tokenize(&o2, &mut |_| {}), &t, &["--chat", ".jsonl or .parquet"]);
}
