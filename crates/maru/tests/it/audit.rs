//! The audit log through a real node: every control action is recorded with who asked and
//! from where (tokens only as keyed hashes), denials too; signed checkpoints; `maru audit
//! verify` finds an edited entry and entries cut off; the chain survives kill -9.

use crate::harness::{Node, hello_manifest};

fn search(node: &Node, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["audit", "search", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str::<Vec<serde_json::Value>>(&node.cli_ok(&all)).expect("JSON")
}

fn audit_files(node: &Node) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(node.data.join("audit")).expect("audit dir") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "log") || path.ends_with("checkpoints") {
            bytes.extend(std::fs::read(path).expect("read"));
        }
    }
    bytes
}

#[test]
fn control_actions_and_denials_are_recorded_and_verify_finds_tampering() {
    let mut node = Node::start();
    node.deploy("hello.toml", &hello_manifest("hi"));
    let denied = node.control_api("DELETE", "/v1/apps/hello", Some("not-the-token"), None);
    assert_eq!(denied.status, 401);
    node.cli_ok(&["rm", "hello"]);

    let deploys = search(&node, &["--action", "apps.deploy"]);
    assert_eq!(deploys.len(), 1, "{deploys:?}");
    assert_eq!(deploys[0]["decision"], "allow");
    assert_eq!(deploys[0]["address"], "127.0.0.1");
    let actor = deploys[0]["actor"].as_str().expect("actor");
    assert!(actor.starts_with("token:hmac:"), "{actor}");
    let removals = search(&node, &["--resource", "app/hello"]);
    let decisions: Vec<&str> = removals
        .iter()
        .map(|e| e["decision"].as_str().expect("decision"))
        .collect();
    assert_eq!(decisions, ["deny", "allow"], "{removals:?}");
    assert_ne!(removals[0]["actor"], actor, "another token, another hash");
    // Components were uploaded before the deploy; the log holds the node's start too.
    assert!(!search(&node, &["--action", "blobs."]).is_empty());
    assert_eq!(search(&node, &["--action", "node.start"]).len(), 1);
    // No secret appears in the log: not the control token, not the wrong one.
    let token = std::fs::read_to_string(node.data.join("token")).expect("token");
    let files = audit_files(&node);
    for secret in [token.trim(), "not-the-token"] {
        assert!(
            !files.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{secret} is in the audit log"
        );
    }
    let text = node.cli_ok(&["audit", "tail", "-n", "50"]);
    assert!(text.contains("apps.remove"), "{text}");

    // A checkpoint kept elsewhere, then the node stopped and the log edited.
    let checkpoint = node.cli_ok(&["audit", "checkpoint"]);
    let kept = node.data.parent().expect("parent").join("checkpoint.json");
    std::fs::write(&kept, &checkpoint).expect("write");
    let kept = kept.to_str().expect("utf-8");
    node.cli_ok(&["audit", "verify", "--checkpoint", kept]);
    node.stop();
    let segment = node.data.join("audit").join(format!("{:020}.log", 1));
    let original = std::fs::read(&segment).expect("read");
    let at = original
        .windows(b"\"deny\"".len())
        .position(|w| w == b"\"deny\"")
        .expect("the denial is in the log");
    let mut edited = original.clone();
    edited[at + 1..at + 5].copy_from_slice(b"DENY");
    std::fs::write(&segment, &edited).expect("write");
    let output = node.cli(&["audit", "verify", "--checkpoint", kept]);
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("TAMPERED"), "{stdout}");

    // Cut off after the first half: the exported checkpoint finds it even with the node's
    // own checkpoints file removed.
    std::fs::write(&segment, &original[..original.len() / 2]).expect("write");
    std::fs::remove_file(node.data.join("audit").join("checkpoints")).expect("remove");
    let output = node.cli(&["audit", "verify", "--checkpoint", kept]);
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("Truncated") || stdout.contains("TAMPERED"),
        "{stdout}"
    );
}

#[test]
fn the_chain_survives_kill_9_and_recovery_is_recorded() {
    let mut node = Node::start();
    for _ in 0..20 {
        node.cli_ok(&["apps"]);
    }
    node.kill();
    node.restart();
    node.cli_ok(&["apps"]);
    let lists = search(&node, &["--action", "apps.list"]);
    assert_eq!(lists.len(), 21, "every acknowledged listing was recorded");
    assert_eq!(search(&node, &["--action", "node.start"]).len(), 2);
    let report: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["audit", "verify", "--json"])).expect("JSON");
    assert!(report["problem"].is_null(), "{report}");
}
