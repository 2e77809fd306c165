//! The `llmq` command-line tool.

mod device;
mod train_args;
mod train_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "llmq", version, about = "Pre-train and fine-tune LLaMA-family models on CPUs and NVIDIA GPUs")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a model (with no options: a small model on the embedded synthetic corpus).
    Train(train_args::TrainArgs),
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Train(a) => train_cmd::run(a),
    };
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
