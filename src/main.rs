//! The `fulcrum` command line.

use clap::Parser;

/// Fulcrum: a Kubernetes operator and Rust proxy that keep an application up
/// and spread its load well.
#[derive(Debug, Parser)]
#[command(name = "fulcrum", version, about, long_about = None)]
struct Cli {}

fn main() {
    let _cli = Cli::parse();
}
