//! Tidy checks: source hygiene and the dependency rules between crates. They run as tests
//! (`cargo test -p xtask`) and as `cargo xtask tidy`.

use std::path::{Path, PathBuf};

use anyhow::bail;

/// Which internal crates each crate may depend on. A crate not listed may depend on none.
const ALLOWED_DEPENDENCIES: &[(&str, &[&str])] = &[
    ("maru-api", &[]),
    ("autopilot", &[]),
    ("disk", &[]),
    ("runtime", &["disk"]),
    ("events", &["disk"]),
    ("store", &["disk"]),
    ("policy", &["disk"]),
    ("gateway", &["runtime", "autopilot", "events", "disk"]),
    (
        "control",
        &[
            "maru-api",
            "runtime",
            "gateway",
            "autopilot",
            "events",
            "disk",
            "store",
            "policy",
        ],
    ),
    ("cluster", &["maru-api", "control", "runtime", "events"]),
    (
        "maru",
        &[
            "maru-api",
            "cluster",
            "runtime",
            "gateway",
            "autopilot",
            "control",
            "events",
            "disk",
            "store",
            "policy",
        ],
    ),
    ("xtask", &[]),
];

const INTERNAL: &[&str] = &[
    "maru-api",
    "disk",
    "autopilot",
    "runtime",
    "gateway",
    "control",
    "events",
    "store",
    "policy",
    "cluster",
    "maru",
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// No unfinished or debugging macros, no ignored or should-panic tests.
pub fn check_hygiene(root: &Path) -> anyhow::Result<()> {
    let mut files = Vec::new();
    for dir in ["crates", "xtask", "examples"] {
        rust_files(&root.join(dir), &mut files);
    }
    // Spelled in pieces so this file does not trip its own check.
    let banned = [
        ["to", "do!("].concat(),
        ["unimple", "mented!("].concat(),
        ["db", "g!("].concat(),
        ["#[ig", "nore"].concat(),
        ["#[should", "_panic"].concat(),
    ];
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        for (number, line) in text.lines().enumerate() {
            for pattern in &banned {
                if line.contains(pattern.as_str()) {
                    problems.push(format!(
                        "{}:{}: `{pattern}`",
                        file.strip_prefix(root).unwrap_or(file).display(),
                        number + 1
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!("finish or remove these:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// Crates depend on each other only as ARCHITECTURE.md says.
pub fn check_dependencies(root: &Path) -> anyhow::Result<()> {
    let mut problems = Vec::new();
    for (krate, allowed) in ALLOWED_DEPENDENCIES {
        let manifest = if *krate == "xtask" {
            root.join("xtask/Cargo.toml")
        } else {
            root.join("crates").join(krate).join("Cargo.toml")
        };
        let text = std::fs::read_to_string(&manifest)?;
        let parsed: toml_lite::Table = toml_lite::parse(&text);
        for section in ["dependencies", "dev-dependencies", "build-dependencies"] {
            for dependency in parsed.keys_of(section) {
                if INTERNAL.contains(&dependency.as_str())
                    && !allowed.contains(&dependency.as_str())
                {
                    problems.push(format!(
                        "{krate} depends on {dependency} ({section}); allowed: {allowed:?}"
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!("crate boundaries broken:\n  {}", problems.join("\n  "));
    }
    Ok(())
}

/// The autopilot decides without I/O: no clock, no disk, no network, no async runtime.
pub fn check_autopilot_is_sans_io(root: &Path) -> anyhow::Result<()> {
    let mut files = Vec::new();
    rust_files(&root.join("crates/autopilot/src"), &mut files);
    let banned = [
        "Instant::now",
        "SystemTime",
        "std::fs",
        "std::net",
        "tokio",
        "std::thread",
        "rand::",
    ];
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        for (number, line) in text.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for pattern in banned {
                if line.contains(pattern) {
                    problems.push(format!(
                        "{}:{}: `{pattern}`",
                        file.strip_prefix(root).unwrap_or(file).display(),
                        number + 1
                    ));
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "autopilot must do no I/O and read no clock (take `now` as a value):\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

/// Files whose every disk access goes through `disk::Disk`, so the power-cut simulation
/// runs exactly the code that runs in production.
const THROUGH_DISK: &[&str] = &[
    "crates/events/src/topic.rs",
    "crates/events/src/topic/recovery.rs",
    "crates/events/src/topic/groups.rs",
    "crates/control/src/files.rs",
    "crates/control/src/state.rs",
    "crates/control/src/token.rs",
    "crates/runtime/src/artifact.rs",
];

/// Persistence code touches files only through the `disk` crate's trait.
pub fn check_persistence_goes_through_disk(root: &Path) -> anyhow::Result<()> {
    let banned = [
        "std::fs",
        "File::",
        "OpenOptions",
        "tokio::fs",
        "SystemTime",
    ];
    let mut problems = Vec::new();
    for file in THROUGH_DISK {
        let text = std::fs::read_to_string(root.join(file))?;
        // Unit tests below `#[cfg(test)]` may plant damage with the OS's own calls.
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        for (number, line) in code.lines().enumerate() {
            if line.trim_start().starts_with("//") {
                continue;
            }
            for pattern in banned {
                if line.contains(pattern) {
                    problems.push(format!("{file}:{}: `{pattern}`", number + 1));
                }
            }
        }
    }
    if !problems.is_empty() {
        bail!(
            "persistence code must use disk::Disk and disk::Clock, not the OS directly:\n  {}",
            problems.join("\n  ")
        );
    }
    Ok(())
}

pub fn check_all(root: &Path) -> anyhow::Result<()> {
    check_hygiene(root)?;
    check_dependencies(root)?;
    check_autopilot_is_sans_io(root)?;
    check_persistence_goes_through_disk(root)
}

/// Just enough TOML to list the keys of a `[section]` in a Cargo.toml, so xtask needs no
/// TOML crate.
mod toml_lite {
    pub struct Table(Vec<(String, String)>);

    pub fn parse(text: &str) -> Table {
        let mut section = String::new();
        let mut keys = Vec::new();
        for line in text.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line.trim_matches(|c| c == '[' || c == ']').to_string();
            } else if let Some((key, _)) = line.split_once(['=', '.'])
                && !line.starts_with('#')
                && !key.trim().is_empty()
            {
                keys.push((section.clone(), key.trim().to_string()));
            }
        }
        Table(keys)
    }

    impl Table {
        pub fn keys_of(&self, section: &str) -> Vec<String> {
            self.0
                .iter()
                .filter(|(s, _)| s == section)
                .map(|(_, k)| k.clone())
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf()
    }

    #[test]
    fn no_unfinished_code() {
        check_hygiene(&root()).expect("hygiene");
    }

    #[test]
    fn crate_dependencies_follow_the_architecture() {
        check_dependencies(&root()).expect("dependencies");
    }

    #[test]
    fn autopilot_does_no_io() {
        check_autopilot_is_sans_io(&root()).expect("sans-io");
    }

    #[test]
    fn persistence_goes_through_the_disk_trait() {
        check_persistence_goes_through_disk(&root()).expect("through disk");
    }

    #[test]
    fn the_checks_catch_what_they_look_for() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("crates/autopilot/src")).expect("mkdir");
        std::fs::write(
            dir.path().join("crates/autopilot/src/lib.rs"),
            format!(
                "fn f() {{ let t = std::time::Instant::now(); {}\"x\"); }}\n",
                ["to", "do!("].concat()
            ),
        )
        .expect("write");
        assert!(check_hygiene(dir.path()).is_err());
        assert!(check_autopilot_is_sans_io(dir.path()).is_err());
    }
}
