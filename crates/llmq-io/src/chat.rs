//! `llmq tokenize --chat`: conversations rendered with the model's chat template, and a loss mask
//! that trains the assistant's replies only.
//!
//! A conversation is a JSON array of messages `{"role": ..., "content": "..."}` with roles
//! `system`, `user`, `assistant` or `tool` (other fields are passed to the template untouched).
//! The template is the `chat_template` string of `tokenizer_config.json` (or a
//! `chat_template.jinja` file) next to the tokenizer, rendered as `transformers` renders it
//! (Jinja with `trim_blocks` and `lstrip_blocks`, `raise_exception`, Python string methods such
//! as `strip` and `startswith`, the special-token strings `bos_token`, `eos_token`, `unk_token`,
//! `pad_token`, `add_generation_prompt` false). No `strftime_now` is defined, so templates that
//! print a date take their fixed default (Llama 3's "26 Jul 2024") and token files are
//! reproducible. The rendered text holds the special tokens, so it is encoded without the
//! tokenizer's post-processor.
//!
//! What is trained (mask 1): for each assistant message, the tokens whose whole byte span lies
//! inside its rendered content, and the token that follows the content if it is a special token
//! (the end of the turn: `<|im_end|>`, `<|eot_id|>`, `</s>`). Nothing else is: not the system
//! and user turns, not the role headers, not the newline after `<|im_end|>`, not the EOS that
//! separates conversations in the token file, and not a token that straddles the content's edge.
//!
//! How the content is found: for assistant message i, the text it adds is the difference between
//! the rendering of messages `..=i` and that of messages `..i` with the generation prompt; the
//! content is searched there (as given, else trimmed, as Llama 3's template trims it). A template
//! whose rendering of a prefix is not a prefix of the whole (one that rewrites earlier turns, as
//! Qwen3's does with reasoning) or that does not print the content verbatim is an error.

use llmq_core::{Error, Result};
use minijinja::{Environment, ErrorKind, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use tokenizers::{Encoding, Tokenizer};

/// Template steps one rendering may take: Qwen2.5's template renders a conversation of 2,000
/// messages within it (tests/chat.rs), and a runaway template stops within about a second.
const TEMPLATE_FUEL: u64 = 20_000_000;

pub const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

/// A loaded chat template with the context `transformers` gives it.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// The file the template came from, for messages.
    pub source: PathBuf,
    specials: serde_json::Map<String, serde_json::Value>,
    /// Ids of the tokenizer's special added tokens (end-of-turn candidates).
    special_ids: HashSet<u32>,
}

/// One assistant message in a rendered conversation: its content's byte range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

/// A rendered conversation and where its assistant contents are.
#[derive(Clone, Debug)]
pub struct Rendered {
    pub text: String,
    pub spans: Vec<Span>,
}

fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        o => o.get("content").and_then(|x| x.as_str()).map(String::from),
    }
}

impl ChatTemplate {
    /// Loads the template from the directory of `tokenizer.json`.
    pub fn load(dir: &Path, tok: &Tokenizer) -> Result<ChatTemplate> {
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: serde_json::Value = match std::fs::read_to_string(&cfg_path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| Error::file(&cfg_path, format!("not valid JSON: {e}")))?,
            Err(_) => serde_json::Value::Null,
        };
        let (source, text) = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => (cfg_path.clone(), s.clone()),
            // the older list form: [{"name": "default", "template": ...}, ...]
            Some(serde_json::Value::Array(a)) => {
                let t = a
                    .iter()
                    .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                    .and_then(|t| t.get("template")?.as_str())
                    .ok_or_else(|| Error::file(&cfg_path, "field `chat_template`: a list without a template named \"default\""))?;
                (cfg_path.clone(), t.to_string())
            }
            Some(other) => {
                return Err(Error::file(&cfg_path, format!("field `chat_template`: expected a string, got {other}")))
            }
            None => {
                let j = dir.join("chat_template.jinja");
                let t = std::fs::read_to_string(&j).map_err(|_| {
                    Error::file(&cfg_path, "no field `chat_template` (and no chat_template.jinja next to it): --chat needs the model's chat template")
                })?;
                (j, t)
            }
        };
        let mut env = Environment::new();
        env.set_syntax(
            minijinja::syntax::SyntaxConfig::builder()
                .trim_blocks(true)
                .lstrip_blocks(true)
                .build()
                .expect("default delimiters are valid"),
        );
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // a template is code from the model's directory: one that loops for ever (or for 10^10
        // steps) fails its first conversation instead of hanging the run
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.add_function("raise_exception", |msg: String| -> std::result::Result<Value, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, format!("raise_exception: {msg}")))
        });
        env.add_template_owned("chat_template", text)
            .map_err(|e| Error::file(&source, format!("field `chat_template`: cannot parse the template: {e}")))?;
        let mut specials = serde_json::Map::new();
        for k in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            if let Some(s) = token_string(cfg.get(k)) {
                specials.insert(k.into(), s.into());
            }
        }
        let special_ids = tok.get_added_tokens_decoder().into_iter().filter(|(_, t)| t.special).map(|(id, _)| id).collect();
        Ok(ChatTemplate { env, source, specials, special_ids })
    }

    fn render(&self, messages: &[serde_json::Value], generation_prompt: bool) -> std::result::Result<String, minijinja::Error> {
        let mut ctx = self.specials.clone();
        ctx.insert("messages".into(), messages.to_vec().into());
        ctx.insert("add_generation_prompt".into(), generation_prompt.into());
        self.env.get_template("chat_template")?.render(Value::from(minijinja::value::Serde(&ctx)))
    }

    /// Validates a conversation (the value of field `field`; `at` says where it is, e.g.
    /// "line 3") and renders it; errors name the input file `input`, `at` and the field.
    pub fn render_conversation(&self, input: &Path, at: &str, field: &str, conv: Option<&serde_json::Value>) -> Result<Rendered> {
        let bad = |m: String| Error::file(input, format!("{at}: {m}"));
        let msgs = match conv {
            Some(serde_json::Value::Array(a)) if !a.is_empty() => a,
            Some(serde_json::Value::Array(_)) => return Err(bad(format!("field `{field}` holds no messages"))),
            Some(other) => return Err(bad(format!("field `{field}`: expected an array of messages, got {}", short(other)))),
            None => return Err(bad(format!("no field `{field}` (a conversation: [{{\"role\": ..., \"content\": ...}}, ...])"))),
        };
        for (i, m) in msgs.iter().enumerate() {
            match m.get("role") {
                Some(serde_json::Value::String(r)) if ROLES.contains(&r.as_str()) => {}
                Some(r) => {
                    return Err(bad(format!("field `{field}[{i}].role`: expected one of {}, got {}", ROLES.join(", "), short(r))))
                }
                None => return Err(bad(format!("field `{field}[{i}]`: no `role`"))),
            }
            match m.get("content") {
                Some(serde_json::Value::String(_)) => {}
                Some(c) => return Err(bad(format!("field `{field}[{i}].content`: expected a string, got {}", short(c)))),
                None => return Err(bad(format!("field `{field}[{i}]`: no `content`"))),
            }
        }
        let tmpl_err = |e: minijinja::Error| {
            bad(format!("field `{field}`: the chat template of {} failed: {e:#}", self.source.display()))
        };
        let text = self.render(msgs, false).map_err(tmpl_err)?;
        let mut spans = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            if m["role"] != "assistant" {
                continue;
            }
            let before = self.render(&msgs[..i], true).map_err(tmpl_err)?;
            let upto = self.render(&msgs[..=i], false).map_err(tmpl_err)?;
            if !upto.starts_with(&before) || !text.starts_with(&upto) {
                return Err(bad(format!(
                    "field `{field}[{i}]`: the chat template of {} renders the conversation up to this assistant message differently from the start of the whole one, so its reply cannot be located",
                    self.source.display()
                )));
            }
            let turn = &upto[before.len()..];
            let content = m["content"].as_str().unwrap_or_default();
            let found = turn.find(content).map(|s| (s, content.len())).or_else(|| {
                let t = content.trim();
                turn.find(t).map(|s| (s, t.len()))
            });
            let Some((s, n)) = found else {
                return Err(bad(format!(
                    "field `{field}[{i}].content`: the chat template of {} does not print this assistant content verbatim, so its tokens cannot be located",
                    self.source.display()
                )));
            };
            spans.push(Span { start: before.len() + s, end: before.len() + s + n });
        }
        Ok(Rendered { text, spans })
    }

    /// The loss mask of an encoded rendering (see the module docs): `enc` must be the encoding of
    /// `r.text` without the post-processor, its offsets in bytes.
    pub fn loss_mask(&self, enc: &Encoding, r: &Rendered) -> Vec<bool> {
        let offs = enc.get_offsets();
        let ids = enc.get_ids();
        let mut mask = vec![false; ids.len()];
        let mut j = 0;
        for sp in &r.spans {
            while j < offs.len() && offs[j].0 < sp.start {
                j += 1;
            }
            while j < offs.len() && offs[j].1 <= sp.end && offs[j].0 < sp.end {
                mask[j] = true;
                j += 1;
            }
            // the end of the turn: the special token right after the content
            if j < offs.len() && offs[j].0 >= sp.end && self.special_ids.contains(&ids[j]) {
                mask[j] = true;
                j += 1;
            }
        }
        mask
    }
}

/// A JSON value cut to a length fit for an error message.
fn short(v: &serde_json::Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}
