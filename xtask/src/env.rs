//! Finding the workspace, running commands, and installing what the tasks need.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context as _, bail};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

pub fn cargo_bin() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// Run cargo in the workspace root; fail if it fails.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new(cargo_bin()).args(args).current_dir(root()))
}

pub fn run(command: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{command:?}");
    let status = command.status().with_context(|| format!("start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

/// Announce a step, and name it if it fails.
pub fn step(name: &str, result: anyhow::Result<()>) -> anyhow::Result<()> {
    result.with_context(|| format!("step `{name}` failed"))?;
    eprintln!("xtask: {name}: ok");
    Ok(())
}

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

pub fn ensure_wasm_target() -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("run rustup (is Rust installed with rustup?)")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == "wasm32-wasip2")
    {
        return Ok(());
    }
    eprintln!("xtask: installing the wasm32-wasip2 target with rustup");
    run(Command::new("rustup").args(["target", "add", "wasm32-wasip2"]))
}

/// Install a Debian package if `program` is not on PATH.
pub fn ensure_debian_package(program: &str, package: &str) -> anyhow::Result<()> {
    if have(program) {
        return Ok(());
    }
    eprintln!("xtask: installing {package} (for {program}) with apt-get");
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let apt = |args: &[&str]| {
        let mut full: Vec<&str> = sudo.to_vec();
        full.push("apt-get");
        full.extend_from_slice(args);
        let mut command = Command::new(full[0]);
        command
            .args(&full[1..])
            .env("DEBIAN_FRONTEND", "noninteractive");
        run(&mut command)
    };
    apt(&["update", "-q"])?;
    apt(&["install", "-y", "-q", package])
        .with_context(|| format!("install {package}; install it by hand and run again"))?;
    if !have(program) {
        bail!("{package} is installed but {program} is still not on PATH");
    }
    Ok(())
}

/// Install pinned PyPI packages with pip if `check` (a command) fails.
pub fn ensure_pip_packages(check: &[&str], packages: &[&str]) -> anyhow::Result<()> {
    let works = Command::new(check[0])
        .args(&check[1..])
        .output()
        .is_ok_and(|o| o.status.success());
    if works {
        return Ok(());
    }
    eprintln!("xtask: installing {} with pip", packages.join(" "));
    pip_install(packages, None)
}

/// `pip install` these packages (pinned by the caller), into `target` if given (its
/// executables then land in `target/bin`).
pub fn pip_install(packages: &[&str], target: Option<&std::path::Path>) -> anyhow::Result<()> {
    let mut command = Command::new("python3");
    command.args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
    ]);
    if let Some(target) = target {
        command.arg("--no-deps").arg("--target").arg(target);
    }
    run(command.args(packages)).with_context(|| {
        format!(
            "install {}; install them by hand and run again",
            packages.join(" ")
        )
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// Build the example components; returns the directory holding the `.wasm` files.
pub fn build_examples() -> anyhow::Result<PathBuf> {
    ensure_wasm_target()?;
    let root = root();
    step(
        "build example components (wasm32-wasip2)",
        cargo(&[
            "build",
            "--release",
            "--quiet",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
            "examples/Cargo.toml",
        ]),
    )?;
    Ok(root.join("examples/target/wasm32-wasip2/release"))
}

/// Build the `maru` binary in release mode and return its path.
pub fn build_maru_release() -> anyhow::Result<PathBuf> {
    eprintln!("xtask: building maru (release; the first build takes several minutes)");
    step(
        "build maru --release",
        cargo(&["build", "--release", "--quiet", "-p", "maru"]),
    )?;
    Ok(root().join("target/release/maru"))
}
