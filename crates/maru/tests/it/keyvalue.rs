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
