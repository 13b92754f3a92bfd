//! Events end to end: HTTP and MQTT ingest (with the real mosquitto clients), triggers
//! delivering to a component, dead letters, a slow consumer, and a crash test that kills
//! `maru` while events are being published.

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::{Node, component};

/// An app with a topic, a reply topic and a dead-letter topic, and the misbehave guest
/// consuming `city.air` at `path`.
fn sensors_manifest(path: &str, trigger_extra: &str) -> String {
    format!(
        r#"[app]
name = "sensors"

[topic."city.air"]
[topic."city.air.replies"]
[topic."city.air.dead"]

[service.echo]
component = "{}"
routes = ["/echo-svc"]

[[service.echo.trigger]]
topic = "city.air"
path = "{path}"
reply_to = "city.air.replies"
{trigger_extra}
"#,
        component("misbehave").display()
    )
}

pub(crate) struct Posted {
    pub status: u16,
    pub body: String,
}

pub(crate) fn post(
    node: &Node,
    path: &str,
    token: Option<&str>,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Posted {
    let agent = crate::harness::agent_for(node, Duration::from_secs(30));
    let scheme = if node.tls { "https" } else { "http" };
    let mut request = agent.post(format!("{scheme}://{}{path}", node.gateway));
    if let Some(token) = token {
        request = request.header("Authorization", format!("Bearer {token}"));
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut response = request
        .send(body)
        .unwrap_or_else(|e| panic!("POST {path} ({} bytes): {e}\n{}", body.len(), node.log()));
    Posted {
        status: response.status().as_u16(),
        body: response.body_mut().read_to_string().unwrap_or_default(),
    }
}

/// Every stored event of a topic: (offset, key, data).
pub(crate) fn read_topic(node: &Node, topic: &str) -> Vec<(u64, String, String)> {
    let mut out = Vec::new();
    let mut from = 0;
    let started = std::time::Instant::now();
    loop {
        let page = node.control_api(
            "GET",
            &format!("/v1/events/{topic}?from={from}&limit=10000"),
            Some(&node.token),
            None,
        );
        // A cluster's topic may be unavailable for a few seconds (JetStream electing a
        // leader after a fault): a careful reader asks again.
        if page.status == 503 && started.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(250));
            continue;
        }
        assert_eq!(page.status, 200, "{}", page.body);
        let page: serde_json::Value = serde_json::from_str(&page.body).expect("json");
        let events = page["events"].as_array().expect("events");
        let next = page["next"].as_u64().expect("next");
        if events.is_empty() {
            if next > from {
                // Offsets that are lost (skipped by recovery): read on after them.
                from = next;
                continue;
            }
            return out;
        }
        for event in events {
            out.push((
                event["offset"].as_u64().expect("offset"),
                event["key"].as_str().unwrap_or("").to_string(),
                event["data"].as_str().unwrap_or("").to_string(),
            ));
        }
        from = next;
    }
}

/// The offset ranges a topic reports lost.
fn lost_ranges(node: &Node, topic: &str) -> Vec<(u64, u64)> {
    let stats: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["events", "stats", "--json"])).expect("json");
    stats
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["name"] == topic)
        .flat_map(|t| t["lost"].as_array().cloned().unwrap_or_default())
        .filter_map(|r| Some((r[0].as_u64()?, r[1].as_u64()?)))
        .collect()
}

fn lag(node: &Node, topic: &str, group: &str) -> Option<u64> {
    let stats: serde_json::Value =
        serde_json::from_str(&node.cli_ok(&["events", "stats", "--json"])).expect("json");
    stats.as_array()?.iter().find(|t| t["name"] == topic)?["groups"]
        .as_array()?
        .iter()
        .find(|g| g["name"] == group)?["lag"]
        .as_u64()
}

fn mosquitto_pub(
    node: &Node,
    password: &str,
    version: &str,
    topic: &str,
    message: &str,
) -> std::process::Output {
    let (host, port) = node.mqtt.rsplit_once(':').expect("host:port");
    Command::new("mosquitto_pub")
        .args([
            "-h", host, "-p", port, "-u", "sensor", "-P", password, "-q", "1",
        ])
        .args(["-V", version, "-t", topic, "-m", message])
        .output()
        .expect("run mosquitto_pub (cargo xtask test installs mosquitto-clients)")
}

#[test]
fn http_ingest_stores_events_and_answers_every_mistake_clearly() {
    let node = Node::start();
    node.deploy("sensors.toml", &sensors_manifest("/reply", ""));
    let token = node.ingest_token.clone();

    let refused = post(&node, "/events/city.air", None, &[], b"x");
    assert_eq!(refused.status, 401, "{}", refused.body);
    assert!(refused.body.contains("ingest token"), "{}", refused.body);
    let refused = post(&node, "/events/city.air", Some(&node.token), &[], b"x");
    assert_eq!(
        refused.status, 401,
        "the control token is not an ingest token"
    );
    let unknown = post(&node, "/events/city.water", Some(&token), &[], b"x");
    assert_eq!(unknown.status, 404);
    assert!(
        unknown.body.contains("declare it in an app manifest"),
        "{}",
        unknown.body
    );
    assert_eq!(node.get("/events/city.air").status, 405);

    let one = post(
        &node,
        "/events/city.air",
        Some(&token),
        &[
            ("ce-partitionkey", "station-1"),
            ("content-type", "application/json"),
        ],
        br#"{"pm25":3}"#,
    );
    assert_eq!(one.status, 202, "{}", one.body);
    assert!(one.body.contains(r#""first_offset":0"#), "{}", one.body);
    let batch =
        br#"[{"type":"air.reading","source":"s2","partitionkey":"station-2","data":{"pm25":4}},
                     {"partitionkey":"station-3","data":"text reading"},
                     {"data_base64":"AAEC"}]"#;
    let stored = post(
        &node,
        "/events/city.air",
        Some(&token),
        &[("content-type", "application/cloudevents-batch+json")],
        batch,
    );
    assert_eq!(stored.status, 202, "{}", stored.body);
    assert!(stored.body.contains(r#""count":3"#), "{}", stored.body);
    assert!(
        stored.body.contains(r#""first_offset":1"#),
        "{}",
        stored.body
    );

    let bad = post(
        &node,
        "/events/city.air",
        Some(&token),
        &[("content-type", "application/cloudevents-batch+json")],
        br#"[{"data":1}, 7]"#,
    );
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(bad.body.contains("event 1 of the batch"), "{}", bad.body);
    let too_big = post(
        &node,
        "/events/city.air",
        Some(&token),
        &[],
        &vec![b'x'; 2 << 20],
    );
    assert_eq!(too_big.status, 413, "{}", too_big.body);
    assert!(too_big.body.contains("limit"), "{}", too_big.body);
    // A declared length over the ingest limit is refused before the body is read.
    let head = format!(
        "POST /events/city.air HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nContent-Length: {}\r\n\r\n",
        9 << 20
    );
    let (answer, _) =
        crate::harness::raw_exchange(&mut node.connect(), head.as_bytes(), Duration::from_secs(5));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");

    // Exactly the accepted events are stored, in order, and nothing of the refused ones.
    let stored = read_topic(&node, "city.air");
    let summary: Vec<(u64, &str, &str)> = stored
        .iter()
        .map(|(o, k, d)| (*o, k.as_str(), d.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (0, "station-1", r#"{"pm25":3}"#),
            (1, "station-2", r#"{"pm25":4}"#),
            (2, "station-3", "text reading"),
            (3, "", "\0\u{1}\u{2}"),
        ]
    );
    // The trigger echoes each event into the reply topic: delivered, and committed.
    node.wait_for(
        "the trigger to deliver every event",
        Duration::from_secs(30),
        || lag(&node, "city.air", "sensors.echo") == Some(0),
    );
    let replies: Vec<String> = read_topic(&node, "city.air.replies")
        .into_iter()
        .map(|(_, _, d)| d)
        .collect();
    assert_eq!(replies.len(), 4, "{replies:?}");
    assert_eq!(replies[0], r#"{"pm25":3}"#);
    let tail = node.cli_ok(&["events", "tail", "city.air", "-n", "2"]);
    assert!(
        tail.contains("text reading") && !tail.contains("pm25\":3"),
        "{tail}"
    );
}

#[test]
fn mqtt_sensors_publish_with_mosquitto_over_3_1_1_and_5() {
    let node = Node::start();
    node.deploy("sensors.toml", &sensors_manifest("/reply", ""));
    let token = node.ingest_token.clone();
    for (version, station) in [("mqttv311", "station-4"), ("mqttv5", "station-5")] {
        let output = mosquitto_pub(
            &node,
            &token,
            version,
            &format!("city/air/{station}"),
            &format!("{{\"at\":\"{station}\"}}"),
        );
        assert!(
            output.status.success(),
            "{version}: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            node.log()
        );
    }
    let refused = mosquitto_pub(&node, "wrong", "mqttv5", "city/air/station-6", "x");
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("Bad User Name or Password"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // MQTT 5 refuses an unknown topic in the PUBACK; 3.1.1 has no way but to close.
    let unknown = mosquitto_pub(&node, &token, "mqttv5", "city/water/x", "x");
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("Topic Name invalid"),
        "{}",
        String::from_utf8_lossy(&unknown.stderr)
    );
    let unknown = mosquitto_pub(&node, &token, "mqttv311", "city/water/x", "x");
    assert!(!unknown.status.success());
    // A payload over the packet limit (256 KiB) is refused, and the connection closed.
    let big = node.manifest("big-payload", &"x".repeat(300 * 1024));
    let (host, port) = node.mqtt.rsplit_once(':').expect("host:port");
    let refused = Command::new("mosquitto_pub")
        .args([
            "-h", host, "-p", port, "-u", "sensor", "-P", &token, "-q", "1",
        ])
        .args(["-V", "mqttv311", "-t", "city/air/station-7", "-f"])
        .arg(&big)
        .output()
        .expect("run mosquitto_pub");
    assert!(!refused.status.success());

    let stored = read_topic(&node, "city.air");
    let summary: Vec<(&str, &str)> = stored
        .iter()
        .map(|(_, k, d)| (k.as_str(), d.as_str()))
        .collect();
    assert_eq!(
        summary,
        vec![
            ("station-4", r#"{"at":"station-4"}"#),
            ("station-5", r#"{"at":"station-5"}"#)
        ]
    );
    // Malformed bytes on the MQTT port: the connection is closed, the node keeps serving.
    let mut raw = std::net::TcpStream::connect(&node.mqtt).expect("connect");
    raw.write_all(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3])
        .expect("send garbage");
    let output = mosquitto_pub(
        &node,
        &token,
        "mqttv311",
        "city/air/station-8",
        "after garbage",
    );
    assert!(output.status.success(), "{}", node.log());
}

#[test]
fn a_consumer_that_always_fails_sends_events_to_the_dead_letter_topic() {
    let node = Node::start();
    node.deploy(
        "sensors.toml",
        &sensors_manifest("/fail", "max_attempts = 2\ndead_letter = \"city.air.dead\""),
    );
    for i in 0..3 {
        let stored = post(
            &node,
            "/events/city.air",
            Some(&node.ingest_token),
            &[("ce-partitionkey", "station-1")],
            format!("reading {i}").as_bytes(),
        );
        assert_eq!(stored.status, 202);
    }
    node.wait_for("three dead letters", Duration::from_secs(30), || {
        read_topic(&node, "city.air.dead").len() == 3
    });
    let dead: Vec<String> = read_topic(&node, "city.air.dead")
        .into_iter()
        .map(|(_, _, d)| d)
        .collect();
    assert_eq!(
        dead,
        ["reading 0", "reading 1", "reading 2"],
        "order is kept"
    );
    node.wait_for("the group to commit", Duration::from_secs(10), || {
        lag(&node, "city.air", "sensors.echo") == Some(0)
    });
    let logs = node.cli_ok(&["logs", "sensors/echo"]);
    assert!(
        logs.contains("failed 2 times") && logs.contains("moved to topic city.air.dead"),
        "{logs}"
    );
    assert!(read_topic(&node, "city.air.replies").is_empty());
}

#[test]
fn a_slow_consumer_lags_without_slowing_ingest_and_catches_up() {
    let node = Node::start();
    node.deploy(
        "sensors.toml",
        &sensors_manifest("/sleep?ms=200", "parallel = 1"),
    );
    // One request stores all 30 (a batch is stored all or none), so the consumer, which
    // needs 200 ms an event, is 6 s behind the moment ingest answers, however fast or slow
    // this machine is.
    let batch: Vec<serde_json::Value> = (0..30)
        .map(|i| {
            serde_json::json!({
                "specversion": "1.0", "id": format!("e{i}"), "source": "test",
                "type": "reading", "data": format!("{i}"),
            })
        })
        .collect();
    let stored = post(
        &node,
        "/events/city.air",
        Some(&node.ingest_token),
        &[("Content-Type", "application/cloudevents-batch+json")],
        serde_json::Value::Array(batch).to_string().as_bytes(),
    );
    assert_eq!(stored.status, 202, "{}", stored.body);
    let behind = lag(&node, "city.air", "sensors.echo").unwrap_or(30);
    assert!(behind > 0, "a consumer of 6 s of work was not behind");
    node.wait_for("the consumer to catch up", Duration::from_secs(60), || {
        lag(&node, "city.air", "sensors.echo") == Some(0)
    });
    let metrics = node
        .control_api("GET", "/metrics", Some(&node.token), None)
        .body;
    assert!(
        metrics.contains("maru_events_consumer_lag{topic=\"city.air\",group=\"sensors.echo\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(
            |l| l.starts_with("maru_events_syncs_total{topic=\"city.air\"} ") && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
    // The operator's table: city.air stored 30 events and synced at least once for them.
    let table = node.cli_ok(&["events", "stats"]);
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("city.air "))
        .unwrap_or_else(|| panic!("no city.air row: {table}"))
        .split_whitespace()
        .collect();
    assert!(
        table.starts_with("TOPIC") && table.contains("PER SYNC"),
        "{table}"
    );
    assert_eq!(row[1], "30", "{table}");
    let per_sync: f64 = row[5].parse().unwrap_or_else(|_| panic!("{table}"));
    assert!((1.0..=30.0).contains(&per_sync), "{table}");
    // Several topics: each family's samples stay together, as the exposition format asks.
    let lines: Vec<&str> = metrics.lines().collect();
    for family in [
        "maru_events_appended_total",
        "maru_events_syncs_total",
        "maru_events_next_offset",
        "maru_events_stored_bytes",
    ] {
        let at: Vec<usize> = (0..lines.len())
            .filter(|&i| lines[i].starts_with(&format!("{family}{{")))
            .collect();
        assert!(at.len() > 1, "{family}: {metrics}");
        assert_eq!(
            at[at.len() - 1] - at[0] + 1,
            at.len(),
            "{family} is split: {metrics}"
        );
    }
}

/// The crash test's app: `city.air` in 64 KiB segments (so segments roll during the test),
/// consumed by two services, each with its own consumer group and reply topic.
fn crash_manifest() -> String {
    format!(
        r#"[app]
name = "sensors"

[topic."city.air"]
segment_size = "64KiB"
[topic."city.air.replies"]
[topic."city.air.audit"]

[service.echo]
component = "{misbehave}"
routes = ["/echo-svc"]

[[service.echo.trigger]]
topic = "city.air"
path = "/reply"
reply_to = "city.air.replies"
parallel = 4

[service.audit]
component = "{misbehave}"
routes = ["/audit-svc"]

[[service.audit.trigger]]
topic = "city.air"
path = "/reply"
reply_to = "city.air.audit"
"#,
        misbehave = component("misbehave").display()
    )
}

/// Publish over MQTT (mosquitto_pub) and HTTP while killing `maru` with SIGKILL at seeded
/// random moments, some rounds also during the next start's recovery; segments roll and
/// two consumer groups read the topic. Every acknowledged event must be stored exactly once
/// and delivered to both groups; offsets may skip only where the topic reports them lost.
#[test]
fn no_acknowledged_event_is_lost_when_maru_is_killed() {
    const ROUNDS: u64 = 20;
    let mut node = Node::start();
    node.deploy("sensors.toml", &crash_manifest());
    let mut seed: u64 = 0x5eed_0005;
    let mut next_random = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut acknowledged: Vec<String> = Vec::new();
    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(150 + next_random() % 900);
        let (host, port) = node.mqtt.rsplit_once(':').expect("host:port");
        let mut publisher = Command::new("mosquitto_pub")
            .args([
                "-h",
                host,
                "-p",
                port,
                "-u",
                "sensor",
                "-P",
                &node.ingest_token,
            ])
            .args([
                "-q",
                "1",
                "-V",
                "mqttv311",
                "-d",
                "-l",
                "-t",
                "city/air/crash",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run mosquitto_pub");
        let mut stdin = publisher.stdin.take().expect("stdin");
        let stdout = publisher.stdout.take().expect("stdout");
        let feeder = std::thread::spawn(move || {
            let mut sent = Vec::new();
            for i in 0..60_000 {
                let line = format!("m-{round}-{i}");
                if stdin.write_all(format!("{line}\n").as_bytes()).is_err()
                    || stdin.flush().is_err()
                {
                    break;
                }
                sent.push(line);
                std::thread::sleep(Duration::from_micros(300));
            }
            sent
        });
        let reader = std::thread::spawn(move || {
            // "sending PUBLISH (d0, q1, r0, m17, ..." then "received PUBACK (Mid: 17, RC:0)".
            let mut sent_mids = Vec::new();
            let mut acked = Vec::new();
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                // The publisher's stdout is a pipe, written in blocks; killing it can leave
                // the last line cut anywhere ("... m10" of "m1021"), so only whole lines count.
                if let Some(rest) = line.split("sending PUBLISH (").nth(1)
                    && line.ends_with(" bytes))")
                {
                    let mid = rest
                        .split(", ")
                        .find_map(|f| f.strip_prefix('m')?.parse::<u32>().ok())
                        .expect("a whole PUBLISH line has a mid");
                    sent_mids.push(mid);
                } else if let Some(rest) = line.split("received PUBACK (Mid: ").nth(1)
                    && line.ends_with(')')
                {
                    let mid: u32 = rest
                        .split(',')
                        .next()
                        .and_then(|m| m.parse().ok())
                        .expect("a whole PUBACK line has a mid");
                    acked.push(mid);
                }
            }
            (sent_mids, acked)
        });
        let http = {
            let gateway = node.gateway.clone();
            let token = node.ingest_token.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs(5)))
                    .build()
                    .into();
                let mut acked = Vec::new();
                for i in 0..100_000 {
                    let payload = format!("h-{round}-{i}");
                    match agent
                        .post(format!("http://{gateway}/events/city.air"))
                        .header("Authorization", format!("Bearer {token}"))
                        .header("ce-partitionkey", "http")
                        .send(payload.as_bytes())
                    {
                        Ok(response) if response.status().as_u16() == 202 => acked.push(payload),
                        Ok(response) => panic!("ingest answered {}", response.status()),
                        Err(_) => break, // maru was killed
                    }
                }
                acked
            })
        };
        std::thread::sleep(kill_after);
        node.kill();
        // The publisher has lost its connection; stop it so the feeder's pipe breaks.
        std::thread::sleep(Duration::from_millis(100));
        _ = publisher.kill();
        _ = publisher.wait();
        let http_acked = http.join().expect("http publisher");
        let sent = feeder.join().expect("feeder");
        let (sent_mids, acked_mids) = reader.join().expect("reader");
        // The i-th PUBLISH carries the i-th line; mids do not repeat within a round.
        let by_mid: BTreeMap<u32, &String> = sent_mids.iter().copied().zip(sent.iter()).collect();
        assert_eq!(
            by_mid.len(),
            sent_mids.len(),
            "mosquitto_pub sent a mid twice"
        );
        for mid in acked_mids {
            acknowledged.push(
                by_mid
                    .get(&mid)
                    .map(|s| (*s).clone())
                    .expect("an acked mid was sent"),
            );
        }
        acknowledged.extend(http_acked);
        if round % 3 == 1 {
            // Killed again while it recovers (opening the topics is the first thing it does).
            node.start_and_kill(Duration::from_millis(next_random() % 400));
        }
        node.restart();
    }
    assert!(
        acknowledged.len() > (ROUNDS as usize) * 50,
        "too few events were acknowledged to test anything: {}",
        acknowledged.len()
    );

    let stored = read_topic(&node, "city.air");
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, _, data) in &stored {
        *counts.entry(data.as_str()).or_default() += 1;
    }
    for event in &acknowledged {
        assert_eq!(
            counts.get(event.as_str()),
            Some(&1),
            "acknowledged event {event} is stored {:?} times",
            counts.get(event.as_str())
        );
    }
    // A write cut short by a kill leaves bytes that are not a whole record; recovery skips
    // the offsets they could have held (never acknowledged) rather than reuse them.
    let lost = lost_ranges(&node, "city.air");
    for pair in stored.windows(2) {
        let (before, after) = (pair[0].0, pair[1].0);
        assert!(after > before, "offsets out of order: {before}, {after}");
        if after != before + 1 {
            assert!(
                lost.iter()
                    .any(|(start, end)| *start <= before + 1 && after <= *end),
                "offsets {}..{after} are missing and not reported lost ({lost:?})",
                before + 1
            );
        }
    }
    let segments = {
        let stats: serde_json::Value =
            serde_json::from_str(&node.cli_ok(&["events", "stats", "--json"])).expect("json");
        stats
            .as_array()
            .into_iter()
            .flatten()
            .find(|t| t["name"] == "city.air")
            .and_then(|t| t["segments"].as_u64())
            .unwrap_or(0)
    };
    assert!(segments > 2, "segments never rolled ({segments})");
    let mut replies = 0;
    for (group, topic) in [
        ("sensors.echo", "city.air.replies"),
        ("sensors.audit", "city.air.audit"),
    ] {
        node.wait_for(
            "every event to be delivered",
            Duration::from_secs(180),
            || lag(&node, "city.air", group) == Some(0),
        );
        let delivered: std::collections::BTreeSet<String> = read_topic(&node, topic)
            .into_iter()
            .map(|(_, _, d)| d)
            .collect();
        for event in &acknowledged {
            assert!(
                delivered.contains(event),
                "acknowledged event {event} was never delivered to {group}"
            );
        }
        replies += delivered.len();
    }
    eprintln!(
        "crash test: {ROUNDS} rounds, {} acknowledged, {} stored in {segments} segments, {} lost ranges, {replies} replies over two groups",
        acknowledged.len(),
        stored.len(),
        lost.len(),
    );
}

/// A backlog keeps `parallel` requests queued at the service, which its scaler sees as
/// load: the consumer scales out while it lags.
#[test]
fn a_lagging_trigger_scales_its_service_out() {
    let node = Node::start();
    let manifest = sensors_manifest("/sleep?ms=300", "parallel = 4").replace(
        "routes = [\"/echo-svc\"]",
        "routes = [\"/echo-svc\"]\ninstances = { min = 0, max = 4 }",
    );
    node.deploy("sensors.toml", &manifest);
    for i in 0..40 {
        let stored = post(
            &node,
            "/events/city.air",
            Some(&node.ingest_token),
            &[("ce-partitionkey", &format!("station-{i}"))],
            b"{}",
        );
        assert_eq!(stored.status, 202);
    }
    let mut most = 0;
    node.wait_for(
        "the backlog to be delivered",
        Duration::from_secs(60),
        || {
            let ready = node.service("sensors", "echo")["instances_ready"]
                .as_u64()
                .unwrap_or(0);
            most = most.max(ready);
            lag(&node, "city.air", "sensors.echo") == Some(0)
        },
    );
    assert!(
        most >= 3,
        "the service grew to only {most} instances while 40 events of 300 ms waited"
    );
}
