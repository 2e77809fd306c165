//! Parquet inputs of `tokenize`: the same texts give the same token files as JSONL.
mod common;
use common::*;
use llmq_io::tokenize::*;
use parquet::basic::{Compression, ZstdLevel};
use parquet::data_type::{ByteArray, ByteArrayType, Int64Type};
use parquet::file::properties::WriterProperties;
use parquet::file::writer::SerializedFileWriter;
use parquet::schema::parser::parse_message_type;
use std::path::Path;
use std::sync::Arc;

/// One column chunk: its values and definition / repetition levels.
enum Col {
    Int(Vec<i64>),
    Bytes(Vec<&'static str>, Vec<i16>, Option<Vec<i16>>),
}

fn write_parquet(path: &Path, schema: &str, compression: Compression, groups: Vec<Vec<Col>>) {
    let schema = Arc::new(parse_message_type(schema).unwrap());
    let props = Arc::new(WriterProperties::builder().set_compression(compression).build());
    let mut w = SerializedFileWriter::new(std::fs::File::create(path).unwrap(), schema, props).unwrap();
    for cols in groups {
        let mut rg = w.next_row_group().unwrap();
        for c in cols {
            let mut cw = rg.next_column().unwrap().unwrap();
            match c {
                Col::Int(v) => {
                    cw.typed::<Int64Type>().write_batch(&v, None, None).unwrap();
                }
                Col::Bytes(v, def, rep) => {
                    let v: Vec<ByteArray> = v.into_iter().map(ByteArray::from).collect();
                    cw.typed::<ByteArrayType>().write_batch(&v, Some(&def), rep.as_deref()).unwrap();
                }
            }
            cw.close().unwrap();
        }
        rg.close().unwrap();
    }
    w.close().unwrap();
}

const TEXT_SCHEMA: &str = "message schema { REQUIRED INT64 id; OPTIONAL BINARY text (UTF8); }";

#[test]
fn parquet_text_column_tokenizes_like_jsonl() {
    let d = tmpdir("pq_text");
    std::fs::write(
        d.join("tokenizer.json"),
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "normalizer": null, "post_processor": null, "decoder": null,
            "added_tokens": [{"id": 1, "content": "[EOS]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "pre_tokenizer": {"type": "Whitespace"},
            "model": {"type": "WordLevel", "vocab": {"[UNK]": 0, "[EOS]": 1, "hello": 2, "world": 3, "foo": 4, "bar": 5}, "unk_token": "[UNK]"}
        })
        .to_string(),
    )
    .unwrap();
    let texts = ["hello world", "", "foo bar bar", "world", "zzz hello", "foo"];
    let jl = d.join("docs.jsonl");
    let lines: Vec<String> = texts.iter().enumerate().map(|(i, t)| serde_json::json!({"id": i, "text": t}).to_string()).collect();
    std::fs::write(&jl, lines.join("\n")).unwrap();
    let mut o = TokenizeOptions::new(vec![jl], d.clone(), d.join("jsonl"));
    o.max_tokens_per_file = 5;
    let want = tokenize(&o, &mut |_| {}).unwrap();

    let groups = || {
        vec![
            vec![Col::Int(vec![0, 1, 2]), Col::Bytes(texts[..3].to_vec(), vec![1; 3], None)],
            vec![Col::Int(vec![3, 4, 5]), Col::Bytes(texts[3..].to_vec(), vec![1; 3], None)],
        ]
    };
    for (name, c) in [("snappy", Compression::SNAPPY), ("zstd", Compression::ZSTD(ZstdLevel::default()))] {
        let pq = d.join(format!("{name}.parquet"));
        write_parquet(&pq, TEXT_SCHEMA, c, groups());
        o.inputs = vec![pq.clone()];
        o.out_dir = d.join(name);
        let mut calls = Vec::new();
        let got = tokenize(&o, &mut |p| calls.push(p)).unwrap();
        assert_eq!((got.documents, got.tokens), (want.documents, want.tokens));
        assert_eq!(got.files.len(), want.files.len());
        for (g, w) in got.files.iter().zip(&want.files) {
            assert_eq!(std::fs::read(&g.path).unwrap(), std::fs::read(&w.path).unwrap(), "{name}: {}", g.path.display());
        }
        let size = std::fs::metadata(&pq).unwrap().len();
        assert_eq!(calls.last().map(|p| (p.bytes_done, p.bytes_total)), Some((size, size)));
    }

    // a null row, a missing column and a column that is not text name the file and the row
    let pq = d.join("bad.parquet");
    let null_groups = vec![vec![Col::Int(vec![0, 1]), Col::Bytes(vec!["hello"], vec![1, 0], None)]];
    write_parquet(&pq, TEXT_SCHEMA, Compression::UNCOMPRESSED, null_groups);
    o.inputs = vec![pq.clone()];
    o.overwrite = true;
    assert_file_err(tokenize(&o, &mut |_| {}), &pq, &["row 1", "field `text` is not a string: null"]);
    o.field = "body".into();
    assert_file_err(tokenize(&o, &mut |_| {}), &pq, &["no column `body`", "columns: id, text"]);
    o.field = "id".into();
    assert_file_err(tokenize(&o, &mut |_| {}), &pq, &["row 0", "field `id` is not a string: 0"]);
    let junk = d.join("junk.parquet");
    std::fs::write(&junk, b"not parquet at all").unwrap();
    o.inputs = vec![junk.clone()];
    assert_file_err(tokenize(&o, &mut |_| {}), &junk, &["not a readable Parquet file"]);
}

#[test]
fn parquet_conversations_read_as_their_jsonl() {
    let d = tmpdir("pq_chat");
    let tmpl = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}";
    std::fs::write(
        d.join("tokenizer.json"),
        serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "normalizer": null, "post_processor": null, "decoder": null,
            "added_tokens": [
                {"id": 5, "content": "<|endoftext|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 6, "content": "<|im_start|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
                {"id": 7, "content": "<|im_end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
            "pre_tokenizer": {"type": "Whitespace"},
            "model": {"type": "WordLevel", "vocab": {"user": 0, "assistant": 1, "hi": 2, "there": 3, "ok": 4}, "unk_token": "ok"}
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(d.join("tokenizer_config.json"), serde_json::json!({"chat_template": tmpl}).to_string()).unwrap();
    let jl = d.join("c.jsonl");
    std::fs::write(
        &jl,
        "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}, {\"role\": \"assistant\", \"content\": \"hi there\"}]}\n\
         {\"messages\": [{\"role\": \"user\", \"content\": \"ok\"}, {\"role\": \"assistant\", \"content\": \"ok\"}, {\"role\": \"user\", \"content\": \"there\"}]}\n",
    )
    .unwrap();
    let mut o = TokenizeOptions::new(vec![jl], d.clone(), d.join("jsonl"));
    o.chat = true;
    o.field = "messages".into();
    let want = tokenize(&o, &mut |_| {}).unwrap();

    // messages: list<struct<role, content>>, the layout datasets write
    let schema = "message schema { OPTIONAL group messages (LIST) { REPEATED group list { OPTIONAL group element {
        OPTIONAL BINARY role (UTF8); OPTIONAL BINARY content (UTF8); } } } }";
    let (def, rep) = (vec![4i16; 5], Some(vec![0i16, 1, 0, 1, 1]));
    let pq = d.join("c.parquet");
    write_parquet(
        &pq,
        schema,
        Compression::SNAPPY,
        vec![vec![
            Col::Bytes(vec!["user", "assistant", "user", "assistant", "user"], def.clone(), rep.clone()),
            Col::Bytes(vec!["hi", "hi there", "ok", "ok", "there"], def, rep),
        ]],
    );
    o.inputs = vec![pq];
    o.out_dir = d.join("pq");
    let got = tokenize(&o, &mut |_| {}).unwrap();
    assert_eq!(got.chat.as_ref().unwrap().1, want.chat.as_ref().unwrap().1);
    assert!(want.chat.as_ref().unwrap().1 > 0);
    assert_eq!(std::fs::read(&got.files[0].path).unwrap(), std::fs::read(&want.files[0].path).unwrap());
}
