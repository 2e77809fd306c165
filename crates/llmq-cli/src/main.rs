//! The `llmq` command-line tool.

mod config_file;
mod device;
mod eval_cmd;
mod files_cmd;
mod generate_cmd;
mod plot;
mod plot_svg;
mod preflight;
mod ranks;
mod signals;
mod train_args;
mod train_cmd;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use llmq_core::{Error, Result};

#[derive(Parser)]
#[command(
    name = "llmq",
    version,
    about = "Pre-train and fine-tune LLaMA-family models on CPUs and NVIDIA GPUs"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

// Parsed once at start-up: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Train a model (with no options: a small model on the embedded synthetic corpus).
    #[command(args_override_self = true)]
    Train(train_args::TrainArgs),
    /// Print the memory plan and an estimated step time of `llmq train` with the same options,
    /// without a device and without reading weights.
    #[command(args_override_self = true)]
    Plan {
        #[command(flatten)]
        args: train_args::TrainArgs,
        /// Also list the largest buffers.
        #[arg(long)]
        verbose: bool,
    },
    /// Draw the train/eval loss curves of a JSON-lines log into an SVG image.
    Plot(plot::PlotArgs),
    /// Turn text or JSONL into token files with a Hugging Face tokenizer.json.
    Tokenize(files_cmd::TokenizeArgs),
    /// Export a checkpoint as a Hugging Face model directory.
    Export(files_cmd::ExportArgs),
    /// Loss and perplexity of a model or checkpoint on token files (no training step).
    Eval(eval_cmd::EvalArgs),
    /// Continue a prompt with a model directory, cache name or checkpoint (KV-cached sampling).
    Generate(generate_cmd::GenerateArgs),
}

/// The command line, with the options of a `--config` file before the command line's own; the
/// effective options are kept (and written to `--save-config`) for the run's log.
fn parse() -> Result<Cli> {
    let mut command = Cli::command();
    let (argv, config) = config_file::expand(std::env::args_os().collect(), &command)?;
    let matches = command.try_get_matches_from_mut(argv).unwrap_or_else(|e| {
        let _ = e.print();
        if let Some(p) = config.filter(|_| e.use_stderr()) {
            eprintln!("(the options include those of --config {}, placed before the command line's)", p.display());
        }
        std::process::exit(e.exit_code())
    });
    let mut cli = Cli::from_arg_matches(&matches).map_err(|e| Error::Config(e.to_string()))?;
    if let (Cmd::Train(args) | Cmd::Plan { args, .. }, Some((name, sub))) = (&mut cli.cmd, matches.subcommand()) {
        let sub_cmd = command.find_subcommand(name).expect("the subcommand just parsed");
        args.effective_config = config_file::effective(sub, sub_cmd);
        if let Some(p) = &args.save_config {
            std::fs::write(p, &args.effective_config).map_err(|e| Error::file(p, format!("--save-config: cannot write: {e}")))?;
        }
    }
    Ok(cli)
}

fn main() {
    // Output into a closed pipe (`llmq plan ... | head`) ends the process quietly, as for other
    // command-line tools, instead of a panic in println!.
    // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition for SIGPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let res = parse().and_then(|cli| match cli.cmd {
        Cmd::Train(a) => train_cmd::run(a),
        Cmd::Plan { args, verbose } => train_cmd::plan(args, verbose),
        Cmd::Plot(a) => plot::run(a),
        Cmd::Tokenize(a) => files_cmd::run_tokenize(a),
        Cmd::Export(a) => files_cmd::run_export(a),
        Cmd::Eval(a) => eval_cmd::run(a),
        Cmd::Generate(a) => generate_cmd::run(a),
    });
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
