//! Every limit holds: runaway and memory-hungry guests, traps, full queues, large bodies,
//! slow clients, outbound network.

use std::io::Write as _;
use std::time::{Duration, Instant};

use crate::harness::{Node, hello_manifest, misbehave_manifest, raw_exchange};

#[test]
fn a_runaway_guest_gets_504_within_its_timeout_while_another_service_serves() {
    let node = Node::start();
    node.deploy("hello.toml", &hello_manifest("Still here"));
    node.deploy(
        "m.toml",
        &misbehave_manifest("runaway", "/r", "timeout = \"1s\""),
    );
    std::thread::scope(|scope| {
        let spin = scope.spawn(|| {
            let started = Instant::now();
            (node.get("/r/spin"), started.elapsed())
        });
        // While the guest spins, the other service answers.
        for _ in 0..5 {
            assert_eq!(node.get("/hello").body, "Still here from Maru!\n");
        }
        let (response, elapsed) = spin.join().expect("spin thread");
        assert_eq!(response.status, 504, "{}", response.body);
        assert!(
            response.body.contains("\"code\":\"timeout\""),
            "{}",
            response.body
        );
        // Bounded, not a timing assertion: without the deadline the request would never end.
        assert!(elapsed < Duration::from_secs(20), "took {elapsed:?}");
    });
    // The spinning instance was discarded; the service still works.
    let echo = node.get("/r/echo");
    assert_eq!(echo.status, 200);
    assert!(
        echo.body.contains("served=1"),
        "a fresh instance serves after the runaway one: {}",
        echo.body
    );
    node.wait_for("the discard to be logged", Duration::from_secs(5), || {
        node.cli_ok(&["logs", "runaway/guest"])
            .contains("discarded: the request ran past its deadline")
    });
}

/// Hardening defect 3: a guest computing without pause held a runtime worker thread for its
/// whole timeout (`epoch_deadline_trap` never yields), so with as many spinning guests as
/// worker threads the node froze: another service's request took 18 s and a control API
/// call 20 s. Guests now yield at every epoch tick. The bound of one second is generous:
/// each answer needs a few ticks of 10 ms.
#[test]
fn twice_as_many_spinning_guests_as_cores_never_freeze_the_node() {
    let node = Node::start();
    node.deploy(
        "hello.toml",
        &format!("{}\n[topic.\"city.load\"]\n", hello_manifest("Still here")),
    );
    let spinners = 2 * std::thread::available_parallelism().map_or(2, |n| n.get());
    node.deploy(
        "m.toml",
        &misbehave_manifest(
            "runaway",
            "/r",
            &format!("timeout = \"20s\"\ninstances = {{ min = 0, max = {spinners} }}"),
        ),
    );
    std::thread::scope(|scope| {
        for _ in 0..spinners {
            scope.spawn(|| {
                let response = node.get("/r/spin");
                assert_eq!(response.status, 504, "{}", response.body);
            });
        }
        node.wait_for("every guest to spin", Duration::from_secs(10), || {
            node.service("runaway", "guest")["in_flight"].as_u64() == Some(spinners as u64)
        });
        for round in 0..3 {
            let started = Instant::now();
            assert_eq!(node.get("/hello").body, "Still here from Maru!\n");
            let hello = started.elapsed();
            let started = Instant::now();
            let api = node.control_api("GET", "/v1/apps", Some(&node.token), None);
            assert_eq!(api.status, 200, "{}", api.body);
            let control = started.elapsed();
            let started = Instant::now();
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let ingest = agent
                .post(format!("http://{}/events/city.load", node.gateway))
                .header("Authorization", format!("Bearer {}", node.ingest_token))
                .send("42")
                .expect("ingest answers");
            assert_eq!(ingest.status(), 202);
            let ingested = started.elapsed();
            eprintln!(
                "round {round}: hello {hello:?}, control API {control:?}, ingest {ingested:?} with {spinners} guests spinning"
            );
            for (what, took) in [
                ("hello", hello),
                ("control API", control),
                ("ingest", ingested),
            ] {
                assert!(
                    took < Duration::from_secs(1),
                    "{what} took {took:?} while {spinners} guests spin"
                );
            }
        }
        assert_eq!(
            node.service("runaway", "guest")["in_flight"].as_u64(),
            Some(spinners as u64),
            "the guests were still spinning while the node answered"
        );
    });
}

/// Hardening defect 7: there was no node-wide bound on buffered request bodies, so
/// connections × `body_limit` could exceed memory. With the budget full, a request waits
/// for room until its deadline and then gets 503; once room returns, requests pass again.
#[test]
fn request_bodies_share_a_node_wide_budget() {
    let node = Node::start_with_config("request_bodies_max = \"1MiB\"");
    node.deploy(
        "slow.toml",
        &misbehave_manifest(
            "uploads",
            "/slow",
            "body_limit = \"1MiB\"\ntimeout = \"30s\"",
        ),
    );
    node.deploy(
        "quick.toml",
        &misbehave_manifest("quick", "/u", "timeout = \"1s\""),
    );
    assert_eq!(node.request("POST", "/u/echo", Some(b"warm")).status, 200);
    // A slow upload declares the whole budget and sends a little of it.
    let mut slow = node.connect();
    slow.write_all(b"POST /slow/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1048576\r\n\r\nabc")
        .expect("send");
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let refused = node.request("POST", "/u/echo", Some(b"small"));
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert!(
        refused.body.contains("\"code\":\"busy\""),
        "{}",
        refused.body
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        started.elapsed()
    );
    drop(slow);
    node.wait_for("room for bodies again", Duration::from_secs(10), || {
        node.request("POST", "/u/echo", Some(b"small")).status == 200
    });
}

#[test]
fn a_memory_hungry_guest_fails_its_request_and_the_node_keeps_running() {
    let node = Node::start();
    node.deploy(
        "m.toml",
        &misbehave_manifest("hungry", "/h", "memory = \"16MiB\""),
    );
    let response = node.get("/h/hog");
    assert_eq!(response.status, 500, "{}", response.body);
    assert!(
        response.body.contains("\"code\":\"guest_failed\""),
        "{}",
        response.body
    );
    assert_eq!(node.get("/h/echo").status, 200);
    let metrics = node
        .control_api("GET", "/metrics", Some(&node.token), None)
        .body;
    assert!(
        metrics.contains(
            "maru_instance_failures_total{app=\"hungry\",service=\"guest\",revision=\"1\"} 1"
        ),
        "{metrics}"
    );
}

#[test]
fn a_trapping_guest_gets_500_and_its_instance_is_replaced() {
    let node = Node::start();
    node.deploy("m.toml", &misbehave_manifest("trappy", "/t", ""));
    assert!(node.get("/t/echo").body.contains("served=1"));
    assert!(
        node.get("/t/echo").body.contains("served=2"),
        "instances are reused across requests"
    );
    let trap = node.get("/t/trap");
    assert_eq!(trap.status, 500);
    assert!(trap.header("x-request-id").is_some());
    assert!(
        node.get("/t/echo").body.contains("served=1"),
        "a trapped instance is never reused"
    );
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    let node = Node::start();
    node.deploy(
        "m.toml",
        &misbehave_manifest(
            "narrow",
            "/n",
            "instances = { min = 0, max = 1 }\nqueue = 1\ntimeout = \"20s\"",
        ),
    );
    std::thread::scope(|scope| {
        let first = scope.spawn(|| node.get("/n/sleep?ms=3000").status);
        node.wait_for("the first request to run", Duration::from_secs(10), || {
            node.service("narrow", "guest")["in_flight"] == 1
        });
        let second = scope.spawn(|| node.get("/n/sleep?ms=10").status);
        node.wait_for(
            "the second request to queue",
            Duration::from_secs(10),
            || node.service("narrow", "guest")["queued"] == 1,
        );
        let third = node.get("/n/echo");
        assert_eq!(third.status, 503, "{}", third.body);
        assert_eq!(third.header("retry-after"), Some("1"));
        assert!(
            third.body.contains("\"code\":\"queue_full\""),
            "{}",
            third.body
        );
        assert_eq!(first.join().expect("first"), 200);
        assert_eq!(
            second.join().expect("second"),
            200,
            "a queued request is served, not dropped"
        );
    });
}

#[test]
fn an_oversized_body_gets_413_declared_or_chunked() {
    let node = Node::start();
    node.deploy(
        "m.toml",
        &misbehave_manifest("small", "/s", "body_limit = \"1KiB\""),
    );
    let fits = node.request("POST", "/s/echo", Some(&[b'x'; 1024]));
    assert!(fits.body.contains("body=1024"), "{}", fits.body);
    let declared = node.request("POST", "/s/echo", Some(&[b'x'; 2048]));
    assert_eq!(declared.status, 413);
    assert!(
        declared.body.contains("\"code\":\"body_too_large\""),
        "{}",
        declared.body
    );
    // Chunked, so the size is only known while reading.
    let mut stream = node.connect();
    let chunk = "x".repeat(600);
    let request = format!(
        "POST /s/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let (answer, _) = raw_exchange(&mut stream, request.as_bytes(), Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
}

/// Hardening defect 10: the control listener had no deadline for the request head, so idle
/// connections could hold it; it now has the gateway's guards (and a connection cap).
#[test]
fn a_slow_client_of_the_control_api_is_cut_off() {
    let node = Node::start_with_config("header_read_timeout = \"1s\"");
    let mut stream = std::net::TcpStream::connect(&node.control).expect("connect");
    let (answer, closed) = raw_exchange(
        &mut stream,
        b"GET /v1/apps HTTP/1.1\r\nHost: t\r\nX-Slow: ",
        Duration::from_secs(15),
    );
    assert!(
        closed,
        "the control API kept a half-sent request open (got {answer:?})"
    );
    let apps = node.control_api("GET", "/v1/apps", Some(&node.token), None);
    assert_eq!(apps.status, 200, "{}", apps.body);
}

#[test]
fn a_slowloris_connection_is_closed() {
    let node = Node::start_with_config("header_read_timeout = \"1s\"");
    node.deploy("hello.toml", &hello_manifest("Hi"));
    let mut stream = node.connect();
    let started = Instant::now();
    // Half a request head, then silence.
    let (answer, closed) = raw_exchange(
        &mut stream,
        b"GET /hello HTTP/1.1\r\nHost: t\r\nX-Slow: ",
        Duration::from_secs(15),
    );
    assert!(
        closed,
        "the server must close a connection that never finishes its headers (got {answer:?})"
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    // A drip-fed header is no better than silence.
    let mut stream = node.connect();
    let dripping = std::thread::spawn(move || {
        for _ in 0..40 {
            if stream.write_all(b"a").is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    });
    assert!(
        dripping.join().expect("drip thread"),
        "a header drip-fed for 4 s must be cut off by the 1 s header deadline"
    );
    // Meanwhile normal clients are served.
    assert_eq!(node.get("/hello").status, 200);
}

#[test]
fn oversized_headers_are_refused() {
    let node = Node::start();
    node.deploy("hello.toml", &hello_manifest("Hi"));
    let mut stream = node.connect();
    let request = format!(
        "GET /hello HTTP/1.1\r\nHost: t\r\nX-Big: {}\r\n\r\n",
        "a".repeat(64 * 1024)
    );
    let (answer, _) = raw_exchange(&mut stream, request.as_bytes(), Duration::from_secs(10));
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
}

#[test]
fn outbound_http_is_denied_unless_the_manifest_allows_the_origin() {
    let node = Node::start();
    node.deploy("hello.toml", &hello_manifest("Reached"));
    let target = format!("http://{}/hello", node.gateway);
    node.deploy("m.toml", &misbehave_manifest("caller", "/o", ""));
    let denied = node.get(&format!("/o/outbound?url={target}"));
    assert!(denied.body.contains("HttpRequestDenied"), "{}", denied.body);
    node.deploy(
        "m.toml",
        &misbehave_manifest(
            "caller",
            "/o",
            &format!("outbound = [\"http://{}\"]", node.gateway),
        ),
    );
    let allowed = node.get(&format!("/o/outbound?url={target}"));
    assert_eq!(allowed.body, "outbound: status 200\n");
}

#[test]
fn unknown_routes_get_404_with_a_request_id() {
    let node = Node::start();
    let response = node.get("/nothing/here");
    assert_eq!(response.status, 404);
    let id = response
        .header("x-request-id")
        .expect("request id")
        .to_string();
    assert!(
        response.body.contains(&format!("\"request_id\":\"{id}\"")),
        "{}",
        response.body
    );
}
