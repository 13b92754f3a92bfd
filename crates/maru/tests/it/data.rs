//! Data access by purpose, classification and region (docs/policy.md), end to end in
//! `examples/traffic`: the signal-control service reads the personal movement traces of its
//! region, with the plates pseudonymised; the statistics office's service without that
//! purpose is refused (403, on the record); both read the public aggregates. Producers
//! publish only where the policies let their token, over HTTP and MQTT.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::events::post;
use crate::harness::{Node, component};

fn search(node: &Node, args: &[&str]) -> Vec<serde_json::Value> {
    let mut all = vec!["audit", "search", "--json"];
    all.extend_from_slice(args);
    serde_json::from_str::<Vec<serde_json::Value>>(&node.cli_ok(&all)).expect("JSON")
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples/traffic")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

fn text(output: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn machine_token(node: &Node, name: &str, role: &str) -> String {
    let created: serde_json::Value = serde_json::from_str(&node.cli_ok(&[
        "tokens", "create", "--name", name, "--role", role, "--ttl", "1h", "--json",
    ]))
    .expect("JSON");
    created["token"].as_str().expect("token").to_string()
}

/// The topic's entry in `maru events stats`.
fn topic_stats(node: &Node, topic: &str) -> serde_json::Value {
    let stats: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["events", "stats", "--json"])).expect("JSON");
    stats
        .as_array()
        .expect("topics")
        .iter()
        .find(|t| t["name"] == topic)
        .cloned()
        .unwrap_or_else(|| panic!("topic {topic} is not listed"))
}

fn group_offset(node: &Node, topic: &str, group: &str) -> u64 {
    topic_stats(node, topic)["groups"]
        .as_array()
        .and_then(|groups| groups.iter().find(|g| g["name"] == group))
        .and_then(|g| g["committed"].as_u64())
        .unwrap_or(0)
}

fn next_offset(node: &Node, topic: &str) -> u64 {
    topic_stats(node, topic)["next_offset"]
        .as_u64()
        .expect("the topic's next offset")
}

#[test]
fn personal_data_reaches_only_the_purpose_it_was_collected_for_in_its_region() {
    component("traffic");
    let node = Node::start_with_config("region = \"eu-central\"\norganisation = \"city\"");
    node.cli_ok(&["deploy", &example("maru.toml")]);
    // The statistics office's report reads the public topics: allowed.
    node.cli_ok(&["deploy", &example("analytics.toml")]);

    // The same service asking for the movement traces is refused at deploy, with the
    // reason and a way out, and the refusal is on the record.
    let analytics = std::fs::read_to_string(example("analytics.toml")).expect("read");
    let greedy = node.manifest(
        "greedy.toml",
        &format!(
            "{}\n[[service.report.trigger]]\ntopic = \"city.movements\"\npath = \"/loops\"\n",
            analytics.replace(
                "../target/wasm32-wasip2/release/traffic.wasm",
                &component("traffic").to_string_lossy()
            )
        ),
    );
    let refused = node.cli(&["deploy", greedy.to_str().expect("utf-8")]);
    assert!(!refused.status.success());
    let said = text(&refused);
    assert!(
        said.contains("(403)")
            && said.contains(
                "service mobility-stats/report may not topic.consume topic/city.movements"
            )
            && said.contains("traffic-signal-control"),
        "{said}"
    );
    let denials = search(
        &node,
        &["--resource", "topic/city.movements", "--decision", "deny"],
    );
    assert!(
        denials.iter().any(
            |e| e["actor"] == "service:mobility-stats/report" && e["action"] == "topic.consume"
        ),
        "{denials:?}"
    );

    // `maru policy test` explains both decisions.
    let explained = node.cli_ok(&[
        "policy",
        "test",
        "--subject",
        "service:traffic/signals",
        "--action",
        "topic.consume",
        "--resource",
        "topic/city.movements",
    ]);
    assert!(
        explained.contains("personal-data-by-purpose"),
        "{explained}"
    );
    let explained = node.cli_ok(&[
        "policy",
        "test",
        "--subject",
        "service:mobility-stats/report",
        "--action",
        "topic.consume",
        "--resource",
        "topic/city.movements",
    ]);
    assert!(explained.contains("no policy permits it"), "{explained}");

    // Public data needs no purpose: a citizens' lab with none reads the loop counts.
    let lab = format!(
        "[app]\nname = \"open-data\"\norganisation = \"citizens-lab\"\n\n[service.counts]\ncomponent = \"{}\"\n\n[[service.counts.trigger]]\ntopic = \"city.traffic\"\npath = \"/loops\"\n",
        component("traffic").display()
    );
    node.deploy("lab.toml", &lab);

    // Connected vehicles report movements (personal) and loops report counts (public).
    let at_ms = 1_700_000_000_000u64;
    let mut movements = Vec::new();
    for i in 0..20u64 {
        movements.push(serde_json::json!({
            "specversion": "1.0", "id": format!("m{i}"), "source": "anpr", "type": "movement",
            "subject": "harbour-gate", "datacontenttype": "application/json",
            "data": { "plate": format!("HB-{:03}", i % 4), "loop": format!("cam-{}", i % 2), "vehicles": 1, "at_ms": at_ms + i * 1000 },
        }));
    }
    let stored = post(
        &node,
        "/events/city.movements",
        Some(&node.ingest_token),
        &[("content-type", "application/cloudevents-batch+json")],
        serde_json::to_vec(&movements).expect("JSON").as_slice(),
    );
    assert_eq!(stored.status, 202, "{}", stored.body);
    let published = search(
        &node,
        &[
            "--resource",
            "topic/city.movements",
            "--action",
            "topic.publish",
        ],
    );
    assert!(
        published
            .iter()
            .any(|e| e["decision"] == "allow" && e["actor"] == "machine:node-ingest"),
        "collecting personal data is on the record: {published:?}"
    );

    // The signal-control service gets them, every delivery on the record first.
    node.wait_for(
        "signals to consume the movements",
        Duration::from_secs(30),
        || group_offset(&node, "city.movements", "traffic.signals") >= 20,
    );
    let consumed = search(
        &node,
        &[
            "--resource",
            "topic/city.movements",
            "--action",
            "topic.consume",
        ],
    );
    let delivery = consumed
        .iter()
        .find(|e| {
            e["actor"] == "service:traffic/signals"
                && e["decision"] == "allow"
                && e["details"]["trigger"] == "traffic.signals"
        })
        .unwrap_or_else(|| panic!("no delivery recorded: {consumed:?}"));
    assert_eq!(
        delivery["details"]["pseudonymised"],
        serde_json::json!(["plate"])
    );
    assert_eq!(
        delivery["details"]["purposes"],
        serde_json::json!(["traffic-signal-control"])
    );

    // Operators: a viewer reads public and internal topics but not personal ones.
    let viewer = machine_token(&node, "dashboard", "viewer");
    let public = node.control_api("GET", "/v1/events/city.traffic", Some(&viewer), None);
    assert_eq!(public.status, 200, "{}", public.body);
    let personal = node.control_api("GET", "/v1/events/city.movements", Some(&viewer), None);
    assert_eq!(personal.status, 403, "{}", personal.body);
    assert!(
        search(
            &node,
            &["--resource", "topic/city.movements", "--decision", "deny"]
        )
        .iter()
        .any(|e| e["actor"] == "machine:dashboard"),
        "the operator's refusal is on the record"
    );

    // Producers: a sensor token may publish only where the policies say.
    let sensors = machine_token(&node, "loop-sensors", "ingest");
    let mut policies = node.cli_ok(&["policy", "show"]);
    policies.push_str(
        "\n@id(\"loop-sensors-only-loops\")\nforbid (principal == Maru::Machine::\"loop-sensors\", action == Maru::Action::\"topic.publish\", resource)\n  unless { resource.name == \"city.traffic\" };\n",
    );
    let file = node.manifest("policies.cedar", &policies);
    node.cli_ok(&["policy", "set", file.to_str().expect("utf-8")]);
    let reading = br#"{"loop":"l1","vehicles":3,"at_ms":1700000000000}"#;
    let allowed = post(&node, "/events/city.traffic", Some(&sensors), &[], reading);
    assert_eq!(allowed.status, 202, "{}", allowed.body);
    let forbidden = post(
        &node,
        "/events/city.movements",
        Some(&sensors),
        &[],
        reading,
    );
    assert_eq!(forbidden.status, 403, "{}", forbidden.body);
    assert!(
        forbidden.body.contains("loop-sensors-only-loops"),
        "{}",
        forbidden.body
    );
    let (host, port) = node.mqtt.rsplit_once(':').expect("host:port");
    let mqtt = |topic: &str| {
        Command::new("mosquitto_pub")
            .args([
                "-h", host, "-p", port, "-u", "sensor", "-P", &sensors, "-q", "1",
            ])
            .args([
                "-V",
                "mqttv5",
                "-t",
                topic,
                "-m",
                std::str::from_utf8(reading).expect("utf-8"),
            ])
            .output()
            .expect("run mosquitto_pub (cargo xtask test installs mosquitto-clients)")
    };
    let ok = mqtt("city/traffic/l1");
    assert!(ok.status.success(), "{}", text(&ok));
    let stored_before = next_offset(&node, "city.movements");
    let refused = mqtt("city/movements/l1");
    assert!(
        !refused.status.success() || text(&refused).to_lowercase().contains("not authori"),
        "{}",
        text(&refused)
    );
    assert_eq!(
        next_offset(&node, "city.movements"),
        stored_before,
        "nothing stored"
    );
    assert!(
        search(
            &node,
            &["--resource", "topic/city.movements", "--decision", "deny"]
        )
        .iter()
        .any(|e| e["actor"] == "machine:loop-sensors" && e["action"] == "topic.publish"),
        "the producer's refusal is on the record"
    );
    // Revoking the token stops it at once, on a connection or not.
    let tokens = node.cli_ok(&["tokens", "list"]);
    let id = tokens
        .lines()
        .find(|l| l.contains("machine:loop-sensors"))
        .and_then(|l| l.split_whitespace().next())
        .expect("the token is listed")
        .to_string();
    node.cli_ok(&["tokens", "revoke", &id]);
    let after = post(&node, "/events/city.traffic", Some(&sensors), &[], reading);
    assert_eq!(after.status, 401, "{}", after.body);
}

#[test]
fn personal_data_of_another_region_is_refused_and_pseudonyms_link_without_identifying() {
    let node = Node::start_with_config("region = \"eu-central\"");
    let echo = component("misbehave");
    // Movement traces kept for the northern region: a service here may not use them, even
    // with the right purpose.
    let abroad = format!(
        "[app]\nname = \"north\"\n\n[topic.\"north.movements\"]\nclassification = \"personal\"\nregion = \"eu-north\"\nallowed_purposes = [\"traffic-signal-control\"]\n\n[service.signals]\ncomponent = \"{}\"\npurposes = [\"traffic-signal-control\"]\n\n[[service.signals.trigger]]\ntopic = \"north.movements\"\npath = \"/reply\"\n",
        echo.display()
    );
    let path = node.manifest("north.toml", &abroad);
    let refused = node.cli(&["deploy", path.to_str().expect("utf-8")]);
    let said = text(&refused);
    assert!(
        !refused.status.success() && said.contains("(403)") && said.contains("region eu-north"),
        "{said}"
    );

    // Here: the service echoes what it receives into a topic of its own, so the test sees
    // exactly what was delivered.
    let local = format!(
        "[app]\nname = \"local\"\n\n[topic.\"local.movements\"]\nclassification = \"personal\"\nallowed_purposes = [\"traffic-signal-control\"]\n\n[topic.\"local.linked\"]\n\n[service.signals]\ncomponent = \"{}\"\npurposes = [\"traffic-signal-control\"]\n\n[[service.signals.trigger]]\ntopic = \"local.movements\"\npath = \"/reply\"\nreply_to = \"local.linked\"\npseudonymise = [\"plate\", \"owner.name\"]\n",
        echo.display()
    );
    node.deploy("local.toml", &local);
    for (plate, name) in [("HB-001", "Ana"), ("HB-002", "Bo"), ("HB-001", "Ana")] {
        let body = serde_json::json!({ "plate": plate, "owner": { "name": name, "kind": "private" }, "speed": 42 });
        let stored = post(
            &node,
            "/events/local.movements",
            Some(&node.ingest_token),
            &[("content-type", "application/json")],
            body.to_string().as_bytes(),
        );
        assert_eq!(stored.status, 202, "{}", stored.body);
    }
    // Not JSON: withheld from the service rather than passed on with the plate in it.
    let stored = post(
        &node,
        "/events/local.movements",
        Some(&node.ingest_token),
        &[],
        b"plate HB-003",
    );
    assert_eq!(stored.status, 202, "{}", stored.body);
    node.wait_for("the echoes", Duration::from_secs(30), || {
        group_offset(&node, "local.movements", "local.signals") >= 4
    });
    let read = node.control_api("GET", "/v1/events/local.linked", Some(&node.token), None);
    assert_eq!(read.status, 200, "{}", read.body);
    let linked: serde_json::Value = serde_json::from_str(&read.body).expect("JSON");
    let events = linked["events"].as_array().expect("events");
    assert_eq!(events.len(), 3, "{}", read.body);
    let payloads: Vec<serde_json::Value> = events
        .iter()
        .map(|e| serde_json::from_str(e["data"].as_str().expect("text")).expect("JSON"))
        .collect();
    assert!(
        !read.body.contains("HB-00") && !read.body.contains("Ana"),
        "{}",
        read.body
    );
    // Replies may come back in any order (the trigger delivers in parallel lanes): the
    // three plates must be two pseudonyms, one of them twice, and the same for the names.
    for field in ["plate", "owner"] {
        let mut seen: Vec<String> = payloads
            .iter()
            .map(|p| {
                let value = if field == "owner" {
                    &p["owner"]["name"]
                } else {
                    &p[field]
                };
                value.as_str().expect("a pseudonym").to_string()
            })
            .collect();
        assert!(seen.iter().all(|p| p.starts_with("pn_")), "{seen:?}");
        seen.sort();
        seen.dedup();
        assert_eq!(
            seen.len(),
            2,
            "the same value links, another differs: {}",
            read.body
        );
    }
    assert_eq!(payloads[0]["owner"]["kind"], "private");
    assert_eq!(payloads[0]["speed"], 42);
}

/// Object requests are decided too: a key an administrator made (role `store`) reads and
/// writes internal buckets, but not a bucket of personal data, even one its scope names;
/// the refusal is on the record.
#[test]
fn a_store_key_cannot_reach_a_personal_bucket() {
    let node = Node::start();
    let manifest = format!(
        "[app]\nname = \"parking\"\n\n[bucket.\"parking-permits\"]\nclassification = \"personal\"\nallowed_purposes = [\"permits\"]\n\n[bucket.\"parking-stats\"]\n\n[service.web]\ncomponent = \"{}\"\nroutes = [\"/parking\"]\n",
        component("hello").display()
    );
    node.deploy("parking.toml", &manifest);
    let key = crate::store::key(&node, &["parking-permits", "parking-stats"]);
    let made = crate::store::aws(&node, &key, &["s3", "mb", "s3://parking-stats"]);
    assert!(made.status.success(), "{}", text(&made));
    let listed = crate::store::aws(&node, &key, &["s3", "ls", "s3://parking-stats"]);
    assert!(listed.status.success(), "internal: {}", text(&listed));
    let refused = crate::store::aws(&node, &key, &["s3", "mb", "s3://parking-permits"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(
        text(&refused).contains("AccessDenied"),
        "{}",
        text(&refused)
    );
    let denials = search(
        &node,
        &["--resource", "bucket/parking-permits", "--decision", "deny"],
    );
    assert!(
        denials.iter().any(|e| e["actor"]
            .as_str()
            .is_some_and(|a| a.starts_with("machine:store-key:"))
            && e["action"] == "bucket.write"),
        "{denials:?}"
    );
}
