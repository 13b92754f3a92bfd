//! `maru sim`: every trace format, deterministic output, clear errors.

use std::process::Command;

use crate::harness::MARU;

/// Small traces in each shared format, named like the shared files so the format is found
/// from the name.
fn write_traces(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let seconds: Vec<String> = (0..4000)
        .map(|i| {
            format!(
                "{}",
                20 + (i % 600) / 10 + if i % 977 < 30 { 200 } else { 0 }
            )
        })
        .collect();
    let mut files = Vec::new();
    let mut write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write trace");
        files.push(path);
    };
    write("twitter-per-second.txt", seconds.join(" "));
    write(
        "worldcup98-per-second.csv",
        std::iter::once("period,count".to_string())
            .chain(seconds.iter().enumerate().map(|(i, c)| {
                format!(
                    "1998-06-25 {:02}:{:02}:{:02},{c}",
                    22 + i / 3600 % 2,
                    i / 60 % 60,
                    i % 60
                )
            }))
            .collect::<Vec<_>>()
            .join("\n"),
    );
    write(
        "wikipedia-en-hourly.csv",
        (0..72)
            .filter(|h| *h != 30)
            .map(|h| {
                format!(
                    "2010-05-{:02} {:02}:00:00;{}",
                    1 + h / 24,
                    h % 24,
                    3_600_000 + (h % 24) * 200_000
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
    );
    let header = (1..=120)
        .map(|m| format!("minute_{m}"))
        .collect::<Vec<_>>()
        .join(",");
    let steady = (0..120)
        .map(|m| (m * 7 % 50).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let bursts = (0..120)
        .map(|m| if m % 30 == 0 { "500" } else { "0" })
        .collect::<Vec<_>>()
        .join(",");
    write(
        "azure-functions-2019-1000fn-per-minute.csv",
        format!("HashFunction,HashApp,HashOwner,{header}\nf1,a1,o1,{steady}\nf2,a2,o2,{bursts}\n"),
    );
    files
}

#[test]
fn sim_runs_every_trace_format_and_repeats_bit_for_bit() {
    let dir = tempfile::tempdir().expect("temp dir");
    for trace in write_traces(dir.path()) {
        let run = || {
            let output = Command::new(MARU)
                .args([
                    "sim",
                    "--json",
                    "--startup",
                    "5s",
                    "--peak-instances",
                    "20",
                    "--trace",
                ])
                .arg(&trace)
                .output()
                .expect("run maru sim");
            assert!(
                output.status.success(),
                "{}: {}",
                trace.display(),
                String::from_utf8_lossy(&output.stderr)
            );
            output.stdout
        };
        let first = run();
        assert_eq!(
            first,
            run(),
            "{}: the same inputs must give the same output",
            trace.display()
        );
        let report: serde_json::Value = serde_json::from_slice(&first).expect("json");
        let rows = report["rows"].as_array().expect("rows");
        assert_eq!(rows.len(), 7, "every policy reports");
        let oracle = rows
            .iter()
            .find(|r| r["policy"] == "oracle")
            .expect("oracle row");
        assert!(
            oracle["availability"].as_f64() > Some(0.99),
            "{}: {oracle}",
            trace.display()
        );
    }
}

#[test]
fn sim_tunes_and_plots() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = write_traces(dir.path()).remove(0);
    let plot = dir.path().join("plot.svg");
    let output = Command::new(MARU)
        .args([
            "sim",
            "--tune",
            "--policy",
            "hpa,predictive,oracle",
            "--startup",
            "5s",
            "--peak-instances",
            "20",
            "--plot",
        ])
        .arg(&plot)
        .arg("--trace")
        .arg(&trace)
        .output()
        .expect("run maru sim");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("tuned on the first 70 %, measured on the rest"),
        "{stdout}"
    );
    for policy in ["hpa", "predictive", "oracle"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(policy)),
            "{policy} missing:\n{stdout}"
        );
    }
    let svg = std::fs::read_to_string(&plot).expect("plot written");
    assert!(
        svg.starts_with("<svg") && svg.contains("polyline") && svg.contains("predictive"),
        "{svg}"
    );
    assert!(
        svg.contains("stroke-dasharray"),
        "predictive's forecast is not drawn: {svg}"
    );
}

#[test]
fn sim_names_what_is_wrong_with_a_bad_trace() {
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("broken-per-second.txt");
    std::fs::write(&trace, "1 2 3\n4 five 6\n").expect("write");
    let output = Command::new(MARU)
        .args(["sim", "--trace"])
        .arg(&trace)
        .output()
        .expect("run maru sim");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("broken-per-second.txt, line 2: `five` is not a count"),
        "{stderr}"
    );
    let good = dir.path().join("good-per-second.txt");
    std::fs::write(&good, "1 2 3\n").expect("write");
    let output = Command::new(MARU)
        .args(["sim", "--policy", "magic", "--trace"])
        .arg(&good)
        .output()
        .expect("run maru sim");
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown policy `magic`"));
}

#[test]
fn replay_sends_the_trace_open_loop_and_reports_like_sim() {
    let node = crate::harness::Node::start();
    node.deploy(
        "m.toml",
        // One instance at most: under a loaded machine (tests run in parallel) a slow first
        // start would otherwise let the scaler start a second, and the count of cold starts
        // below would depend on timing.
        &crate::harness::misbehave_manifest(
            "replayed",
            "/r",
            "idle_timeout = \"2s\"\ninstances = { min = 0, max = 1 }",
        ),
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let trace = dir.path().join("tiny-per-second.txt");
    // Ten trace seconds at 2× speed: five real seconds, the second half twice as busy.
    std::fs::write(&trace, "10 10 10 10 10 20 20 20 20 20").expect("write trace");
    let url = format!("http://{}/r/echo", node.gateway);
    let output = node.cli(&[
        "replay",
        "--json",
        "--trace",
        trace.to_str().expect("utf-8"),
        "--speed",
        "2",
        "--peak-rps",
        "40",
        "--url",
        &url,
        "--service",
        "replayed/guest",
    ]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).expect("json");
    // Real seconds carry 20, 20, 30, 40, 40 trace requests, scaled so the peak is 40/s.
    assert_eq!(
        report["rates"],
        serde_json::json!([20.0, 20.0, 30.0, 40.0, 40.0])
    );
    assert_eq!(report["requests"], 150);
    assert_eq!(report["availability"], 1.0, "{report}");
    assert!(report["instance_seconds"].as_f64() > Some(0.0), "{report}");
    assert_eq!(report["cold_starts"], 1);
}
