//! TLS by default on every listener (docs/node.md#tls): the node makes its CA and a server
//! certificate at first start; the CLI trusts the CA from the data directory; curl, the AWS
//! CLI and mosquitto reach the gateway, S3 and MQTT with it; sslscan (Debian's) finds no
//! protocol below TLS 1.2 and no weak cipher on any of the four; old protocols and plain
//! text are refused.

use std::process::{Command, Output};

use crate::harness::{Node, hello_manifest};

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(args)
        .output()
        .expect("run curl")
}

/// sslscan's verdict on one listener: the protocols it found enabled and the accepted
/// cipher lines.
fn sslscan(address: &str) -> (Vec<String>, Vec<String>) {
    let output = Command::new("sslscan")
        .args(["--no-colour", "--no-heartbleed", address])
        .output()
        .expect("run sslscan (cargo xtask test installs it from Debian)");
    let report = text(&output);
    assert!(output.status.success(), "{report}");
    let enabled = report
        .lines()
        .filter(|l| l.trim_end().ends_with("enabled"))
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    let ciphers = report
        .lines()
        .filter(|l| l.starts_with("Accepted") || l.starts_with("Preferred"))
        .map(str::to_string)
        .collect();
    (enabled, ciphers)
}

#[test]
fn every_listener_speaks_tls_1_2_or_1_3_with_strong_ciphers_only() {
    let node = Node::start_tls("");
    let ca = node.data.join("tls/ca.pem");
    assert!(ca.exists(), "the node made its CA");
    let node_file: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(node.data.join("node.json")).expect("node.json"),
    )
    .expect("JSON");
    assert_eq!(
        node_file["tls"],
        serde_json::json!(["gateway", "control", "mqtt", "s3"])
    );

    // The CLI trusts the node's CA from the data directory.
    node.deploy("hello.toml", &hello_manifest("hi over TLS"));
    let ca_arg = ca.to_str().expect("utf-8");
    let hello = curl(&[
        "--cacert",
        ca_arg,
        &format!("https://{}/hello", node.gateway),
    ]);
    assert!(text(&hello).contains("hi over TLS"), "{}", text(&hello));
    // Also by name: the certificate covers localhost.
    let port = node.gateway.rsplit_once(':').expect("port").1;
    let by_name = curl(&[
        "--cacert",
        ca_arg,
        &format!("https://localhost:{port}/hello"),
    ]);
    assert!(text(&by_name).contains("hi over TLS"), "{}", text(&by_name));
    // A client that does not trust the node's CA refuses it.
    let untrusted = curl(&[&format!("https://{}/hello", node.gateway)]);
    assert!(!untrusted.status.success(), "{}", text(&untrusted));
    // Plain HTTP gets no answer, and old protocols are refused.
    let plain = curl(&[&format!("http://{}/hello", node.gateway)]);
    assert!(!plain.status.success(), "{}", text(&plain));
    for old in ["--tlsv1.0", "--tlsv1.1"] {
        let refused = curl(&[
            "--cacert",
            ca_arg,
            old,
            "--tls-max",
            &old[6..],
            &format!("https://{}/hello", node.gateway),
        ]);
        assert!(!refused.status.success(), "{old}: {}", text(&refused));
    }
    let modern = curl(&[
        "--cacert",
        ca_arg,
        "--tlsv1.2",
        "--tls-max",
        "1.2",
        &format!("https://{}/hello", node.gateway),
    ]);
    assert!(modern.status.success(), "{}", text(&modern));

    // sslscan on all four listeners.
    for (what, address) in [
        ("gateway", &node.gateway),
        ("control", &node.control),
        ("mqtt", &node.mqtt),
        ("s3", &node.s3),
    ] {
        let (enabled, ciphers) = sslscan(address);
        assert_eq!(enabled, ["TLSv1.2", "TLSv1.3"], "{what}: {enabled:?}");
        assert!(!ciphers.is_empty(), "{what}");
        for line in &ciphers {
            let bits: u32 = line
                .split_whitespace()
                .nth(2)
                .and_then(|b| b.parse().ok())
                .unwrap_or(0);
            let weak = ["CBC", "RC4", "3DES", "DES-", "NULL", "EXP", "MD5", "SHA "]
                .iter()
                .any(|w| line.contains(w));
            assert!(
                bits >= 128 && !weak && (line.contains("GCM") || line.contains("CHACHA20")),
                "{what}: weak cipher accepted: {line}"
            );
        }
    }

    // MQTT over TLS with mosquitto, trusting the CA.
    node.deploy(
        "sensors.toml",
        "[app]\nname = \"sensors\"\n\n[topic.\"city.air\"]\n\n[service.sink]\ncomponent = \"COMPONENT\"\n"
            .replace(
                "COMPONENT",
                &crate::harness::component("hello").to_string_lossy(),
            )
            .as_str(),
    );
    let (host, port) = node.mqtt.rsplit_once(':').expect("host:port");
    let published = Command::new("mosquitto_pub")
        .args(["-h", host, "-p", port, "--cafile", ca_arg, "-u", "sensor"])
        .args(["-P", &node.ingest_token, "-q", "1", "-V", "mqttv5"])
        .args(["-t", "city/air/station-1", "-m", "{\"pm10\":12}"])
        .output()
        .expect("run mosquitto_pub");
    assert!(published.status.success(), "{}", text(&published));
    let read = node.cli_ok(&["events", "tail", "city.air", "--json"]);
    assert!(read.contains("pm10"), "{read}");

    // S3 over TLS with the AWS CLI, trusting the CA.
    let key = crate::store::key(&node, &["reports"]);
    let made = crate::store::aws(&node, &key, &["s3", "mb", "s3://reports"]);
    assert!(made.status.success(), "{}", text(&made));
    let listed = crate::store::aws(&node, &key, &["s3", "ls"]);
    assert!(text(&listed).contains("reports"), "{}", text(&listed));
}
