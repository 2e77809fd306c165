//! Config files of `llmq train` and `llmq plan`: a TOML table whose keys are the flags' names
//! (kebab or snake case) and whose values are TOML strings, numbers and booleans.
//!
//! `--config FILE` turns the table into `--key=value` arguments placed before the command line's
//! own, and the subcommand lets a later occurrence of an option win (`args_override_self`), so
//! flags on the command line override the file. A boolean flag is `key = true` (false leaves it
//! off). The effective options of a parsed command are written back as the same kind of TOML
//! (`--save-config`, and the `config` record of the JSON log), so that a run can be repeated from
//! its own record.

use clap::{Arg, ArgAction, ArgMatches, Command};
use llmq_core::{Error, Result};
use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// Subcommands that take `--config` (both have the options of `TrainArgs`).
const COMMANDS: [&str; 2] = ["train", "plan"];

/// Options that say where configuration comes from or goes: never written into a config file.
const NOT_SAVED: [&str; 3] = ["config", "save-config", "help"];

/// `argv` with the options of its `--config FILE` (if any) inserted after the subcommand, and
/// that file.
pub fn expand(argv: Vec<OsString>, cli: &Command) -> Result<(Vec<OsString>, Option<PathBuf>)> {
    let Some(sub) = argv.get(1).and_then(|s| s.to_str()).filter(|s| COMMANDS.contains(s)).and_then(|s| cli.find_subcommand(s)) else {
        return Ok((argv, None));
    };
    let mut path = None;
    for (i, a) in argv.iter().enumerate().skip(2) {
        let given = match a.to_str() {
            Some("--config") => Some(argv.get(i + 1).map(PathBuf::from).ok_or_else(|| Error::Config("--config needs a file".into()))?),
            Some(s) => s.strip_prefix("--config=").map(PathBuf::from),
            None => None,
        };
        if let Some(p) = given {
            if path.replace(p).is_some() {
                return Err(Error::Config("--config is given more than once".into()));
            }
        }
    }
    let Some(path) = path else { return Ok((argv, None)) };
    let text = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, format!("--config: cannot read: {e}")))?;
    let args = file_args(&text, &path, sub)?;
    let mut out = argv[..2].to_vec();
    out.extend(args.into_iter().map(OsString::from));
    out.extend(argv[2..].iter().cloned());
    Ok((out, Some(path)))
}

/// The arguments a config file's text stands for.
fn file_args(text: &str, path: &Path, sub: &Command) -> Result<Vec<String>> {
    let table: toml::Table = text.parse().map_err(|e| Error::file(path, format!("--config: not a valid TOML file: {e}")))?;
    let mut args = vec![];
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let bad = |what: String| Error::file(path, format!("key `{key}`: {what}"));
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && !NOT_SAVED.contains(&long.as_str()))
            .ok_or_else(|| bad(format!("not an option of `llmq {}` (see `llmq {} --help`)", sub.get_name(), sub.get_name())))?;
        let text = match value {
            toml::Value::Boolean(b) if is_flag(arg) => {
                if *b {
                    args.push(format!("--{long}"));
                }
                continue;
            }
            _ if is_flag(arg) => return Err(bad(format!("--{long} is a flag: expected true or false, got {value}"))),
            // an option whose value may be left out (--continue): `true` gives it bare
            toml::Value::Boolean(true) if arg.get_num_args().is_some_and(|n| n.min_values() == 0) => {
                args.push(format!("--{long}"));
                continue;
            }
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            other => return Err(bad(format!("expected a string, number or boolean, got {other}"))),
        };
        args.push(format!("--{long}={text}"));
    }
    Ok(args)
}

fn is_flag(arg: &Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue)
}

/// The effective options of `matches` (subcommand `sub`) as a config file: every option with a
/// value, given or default, and every flag; numbers as TOML numbers where the text is the same.
pub fn effective(matches: &ArgMatches, sub: &Command) -> String {
    let mut table = toml::Table::new();
    for arg in sub.get_arguments() {
        let Some(long) = arg.get_long().filter(|l| !NOT_SAVED.contains(l)) else { continue };
        let id = arg.get_id().as_str();
        let value = if is_flag(arg) {
            toml::Value::Boolean(matches.get_flag(id))
        } else {
            let Some(raw) = matches.try_get_raw(id).ok().flatten().and_then(|mut v| v.next()) else { continue };
            typed(&raw.to_string_lossy(), arg)
        };
        table.insert(long.to_string(), value);
    }
    format!("# the effective options of `llmq {0}`; `llmq {0} --config FILE` repeats them\n{table}", sub.get_name())
}

/// A float for a float option (it reads back as the same f64); an integer where it reads back
/// as the same text; else a string (a path named `1.0` stays one).
fn typed(raw: &str, arg: &Arg) -> toml::Value {
    let float_option = arg.get_value_parser().type_id() == clap::builder::ValueParser::from(clap::value_parser!(f64)).type_id();
    match (raw.parse::<f64>(), raw.parse::<i64>()) {
        (Ok(f), _) if float_option && f.is_finite() => toml::Value::Float(f),
        (_, Ok(i)) if i.to_string() == raw => toml::Value::Integer(i),
        _ => toml::Value::String(raw.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train_args::TrainArgs;
    use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

    #[derive(Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Sub,
    }
    #[derive(Subcommand)]
    enum Sub {
        #[command(args_override_self = true)]
        Train(TrainArgs),
    }

    /// `llmq train ARGS` with `toml` as its --config file: the parsed options and their
    /// effective config.
    fn parse(toml: Option<&str>, args: &[&str]) -> Result<(TrainArgs, String)> {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = std::env::temp_dir().join(format!("llmq-config-unit-{}-{n}.toml", std::process::id()));
        let mut argv: Vec<OsString> = ["llmq", "train"].iter().chain(args).map(OsString::from).collect();
        if let Some(t) = toml {
            std::fs::write(&file, t).unwrap();
            argv.extend(["--config".into(), file.clone().into()]);
        }
        let mut cmd = Cli::command();
        let expanded = expand(argv, &cmd);
        let _ = std::fs::remove_file(&file);
        let (argv, _) = expanded?;
        let m = cmd.try_get_matches_from_mut(argv).map_err(|e| Error::Config(e.to_string()))?;
        let Sub::Train(a) = Cli::from_arg_matches(&m).unwrap().cmd;
        let (_, sub) = m.subcommand().unwrap();
        Ok((a, effective(sub, cmd.find_subcommand("train").unwrap())))
    }

    /// Every option's value, for comparisons (the config file's path aside).
    fn values(a: &TrainArgs) -> String {
        format!("{:?}", TrainArgs { config: None, ..a.clone() })
    }

    #[test]
    fn file_keys_are_flags_in_either_case_and_flags_override_them() {
        let (a, _) = parse(Some("batch_size = 3\nseq-len = 7\nfrom_scratch = true\nrandom-data = false\nlearning-rate = 1e-2\ncontinue = true\nckpt-dir = \"ck\"\n"), &["--seq-len", "9"]).unwrap();
        assert_eq!((a.opts.batch_size, a.opts.seq_len, a.opts.from_scratch, a.opts.random_data, a.opts.learning_rate), (3, 9, true, false, 1e-2));
        assert_eq!(a.continue_from.as_deref(), Some("latest"));
        let e = parse(Some("steps = 2\nmodel_name = \"x\"\n"), &[]).unwrap_err().to_string();
        assert!(e.contains(".toml") && e.contains("key `model_name`: not an option of `llmq train`"), "{e}");
        let e = parse(Some("steps = [2]\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("key `steps`: expected a string, number or boolean"), "{e}");
        let e = parse(Some("profile = 1\n"), &[]).unwrap_err().to_string();
        assert!(e.contains("key `profile`: --profile is a flag: expected true or false, got 1"), "{e}");
    }

    #[test]
    fn the_effective_config_parses_back_to_the_same_options() {
        let args = ["--learning-rate", "3e-3", "--model", "1.0", "--from-scratch", "--continue", "12", "--ckpt-dir", "c", "--seed", "18446744073709551615", "--memory-limit", "16GiB", "--warmup", "0"];
        let (a, saved) = parse(None, &args).unwrap();
        assert!(saved.contains("\nlearning-rate = 0.003\n") && saved.contains("\nmodel = \"1.0\"\n") && saved.contains("\ncontinue = 12\n"), "{saved}");
        let (b, again) = parse(Some(&saved), &[]).unwrap();
        assert_eq!(values(&a), values(&b));
        assert_eq!(saved, again);
        assert_ne!(values(&a), values(&parse(None, &args[..args.len() - 2]).unwrap().0), "the comparison sees a changed option");
    }
}
