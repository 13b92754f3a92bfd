//! Key-value storage for components: `examples/reservations`, built with the published
//! `wasi:keyvalue` guest bindings (not Maru's own code), keeps its bookings in its app's
//! bucket.

use crate::harness::{Node, component};

fn manifest(app: &str, route: &str, kv: &str) -> String {
    format!(
        "[app]\nname = \"{app}\"\n\n[service.api]\ncomponent = \"{}\"\nroutes = [\"{route}\"]\ninstances = {{ min = 2, max = 2 }}\n{kv}\n",
        component("reservations").display()
    )
}

fn book(node: &Node, route: &str, slot: &str, name: &str) -> (u16, String) {
    let body = format!("{{\"slot\":\"{slot}\",\"name\":\"{name}\"}}");
    let answer = node.request("POST", route, Some(body.as_bytes()));
    (answer.status, answer.body)
}

#[test]
fn bookings_are_kept_in_key_value_storage_shared_by_instances_and_across_restarts() {
    let mut node = Node::start();
    node.deploy(
        "reservations.toml",
        &manifest(
            "reservations",
            "/reservations",
            "[kv.bookings]\nvalue_bytes_max = \"4KiB\"\n",
        ),
    );
    // Two instances share the bucket: every slot is booked once however the requests spread.
    let mut created = 0;
    for round in 0..3 {
        for hour in 8..14 {
            let (status, body) = book(
                &node,
                "/reservations",
                &format!("2026-12-01T{hour:02}:00"),
                &format!("citizen {round}"),
            );
            match status {
                201 => created += 1,
                409 => assert!(body.contains("already booked"), "{body}"),
                other => panic!("{other}: {body}"),
            }
        }
    }
    assert_eq!(created, 6, "each of six slots booked exactly once");
    let listed = node.get("/reservations");
    assert!(listed.body.contains("\"total\":6"), "{}", listed.body);
    node.stop();
    node.restart();
    let listed = node.get("/reservations");
    assert_eq!(listed.status, 200, "{}", listed.body);
    assert!(
        listed.body.contains("\"total\":6") && listed.body.contains("citizen 0"),
        "after a restart: {}",
        listed.body
    );
    let (status, _) = book(&node, "/reservations", "2026-12-01T08:00", "late");
    assert_eq!(status, 409, "still taken after the restart");

    // Another app cannot open a bucket it did not declare: its guest gets no-such-store.
    node.deploy("other.toml", &manifest("other-desk", "/other", ""));
    let (status, body) = book(&node, "/other", "2026-12-01T08:00", "intruder");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("NoSuchStore"), "{body}");
    // A value over the bucket's limit is refused, and nothing is stored.
    let long = "x".repeat(5000);
    let (status, body) = book(&node, "/reservations", "2026-12-02T08:00", &long);
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("4096"), "the limit is named: {body}");
    let (status, body) = book(&node, "/reservations", "2026-12-02T08:00", "Choi");
    assert_eq!(
        status, 201,
        "the refused booking did not keep the slot: {body}"
    );
}

/// A bucket of personal data (citizens' names) serves only services that declare a purpose
/// it was collected for; every call is on the record, with the key only as a keyed hash. A
/// service without the purpose gets `access-denied` from `wasi:keyvalue`, and the denial
/// is recorded too.
#[test]
fn personal_buckets_serve_only_their_purpose_and_every_call_is_recorded() {
    let node = Node::start();
    let personal =
        "[kv.bookings]\nclassification = \"personal\"\nallowed_purposes = [\"reservations\"]\n";
    node.deploy(
        "booked.toml",
        &manifest(
            "booked",
            "/booked",
            &format!("purposes = [\"reservations\"]\n\n{personal}"),
        ),
    );
    let (status, body) = book(&node, "/booked", "2026-12-01T08:00", "Ana Example");
    assert_eq!(status, 201, "{body}");
    let listed = node.get("/booked");
    assert!(listed.body.contains("Ana Example"), "{}", listed.body);
    let search = |args: &[&str]| -> Vec<serde_json::Value> {
        let mut all = vec!["audit", "search", "--json"];
        all.extend_from_slice(args);
        serde_json::from_str(&node.cli_ok(&all)).expect("JSON")
    };
    let calls = search(&["--resource", "kv/booked/bookings"]);
    let actions: Vec<&str> = calls.iter().filter_map(|e| e["action"].as_str()).collect();
    assert!(
        actions.contains(&"kv.write") && actions.contains(&"kv.read"),
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .all(|e| e["decision"] == "allow" && e["actor"] == "service:booked/api")
    );
    let text = serde_json::to_string(&calls).expect("JSON");
    assert!(
        !text.contains("2026-12-01T08:00") && text.contains("hmac:"),
        "keys appear only as keyed hashes: {text}"
    );

    // The same component without the purpose: every call refused.
    node.deploy("nosy.toml", &manifest("nosy", "/nosy", personal));
    let (status, body) = book(&node, "/nosy", "2026-12-01T09:00", "Bo");
    assert_eq!(status, 500, "{body}");
    assert!(body.contains("AccessDenied"), "{body}");
    let denied = search(&["--resource", "kv/nosy/bookings", "--decision", "deny"]);
    assert!(
        denied.iter().any(|e| e["actor"] == "service:nosy/api"),
        "{denied:?}"
    );
}
