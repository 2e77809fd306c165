//! The `llmq` command-line tool.

mod backend_args;
mod device;
mod files_cmd;
mod generate_cmd;
mod plot;
mod preflight;
mod ranks;
mod signals;
mod train_args;
mod train_cmd;

use clap::{Parser, Subcommand};

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
    Train(train_args::TrainArgs),
    /// Print the memory plan and an estimated step time of `llmq train` with the same options,
    /// without a device and without reading weights.
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
    /// Continue a prompt with a model directory, cache name or checkpoint (KV-cached sampling).
    Generate(generate_cmd::GenerateArgs),
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Train(a) => train_cmd::run(a),
        Cmd::Plan { args, verbose } => train_cmd::plan(args, verbose),
        Cmd::Plot(a) => plot::run(a),
        Cmd::Tokenize(a) => files_cmd::run_tokenize(a),
        Cmd::Export(a) => files_cmd::run_export(a),
        Cmd::Generate(a) => generate_cmd::run(a),
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
