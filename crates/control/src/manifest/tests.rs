use expect_test::{Expect, expect};
use proptest::prelude::*;

use super::*;

const GOOD: &str = r#"
[app]
name = "hello"

[service.hello]
component = "hello.wasm"
routes = ["/hello"]
instances = { min = 0, max = 20 }
concurrency = 1
idle_timeout = "30s"
memory = "64MiB"
timeout = "10s"
outbound = ["https://api.example.org"]
env = { GREETING = "hi" }
"#;

/// Parse `text` and render either a summary of the result or the error, as a user sees it.
fn check(text: &str, expect: Expect) {
    let actual = match parse("maru.toml", text) {
        Ok(app) => app
            .services
            .iter()
            .map(|(name, s)| {
                format!(
                    "{}/{name}: {} routes={:?} hosts={:?} instances={}..{} idle={:?} memory={} timeout={:?} queue={} body={} outbound={} env={:?}",
                    app.name,
                    match &s.workload {
                        Workload::Component { path } => path.clone(),
                        Workload::Process(p) => format!("process {:?} in {} ready={:?}/{:?} liveness={:?} stop={:?}/{:?}", p.command, p.workdir, p.ready, p.ready_timeout, p.liveness, p.stop_signal, p.stop_timeout),
                    },
                    s.routes,
                    s.hosts,
                    s.instances_min,
                    s.instances_max,
                    s.idle_timeout,
                    s.memory_bytes.map(format_size).unwrap_or_else(|| "unlimited".into()),
                    s.timeout,
                    s.queue,
                    format_size(s.body_limit_bytes),
                    s.outbound.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
                    s.env
                )
            })
            .collect::<Vec<_>>()
            .join("\n"),
        Err(error) => error.to_string(),
    };
    expect.assert_eq(&actual);
}

#[test]
fn good_manifest_with_every_field() {
    check(
        GOOD,
        expect![[
            r#"hello/hello: hello.wasm routes=["/hello"] hosts=[] instances=0..20 idle=30s memory=64MiB timeout=10s queue=1000 body=1MiB outbound=https://api.example.org:443 env={"GREETING": "hi"}"#
        ]],
    );
}

#[test]
fn defaults_fill_in() {
    check(
        "[app]\nname = \"a\"\n[service.web]\ncomponent = \"w.wasm\"\nroutes = [\"/\", \"/api/\"]\nhosts = [\"Web.Local\"]\n",
        expect![[
            r#"a/web: w.wasm routes=["/", "/api"] hosts=["web.local"] instances=0..10 idle=30s memory=64MiB timeout=10s queue=1000 body=1MiB outbound= env={}"#
        ]],
    );
}

#[test]
fn unknown_field_names_line_and_field() {
    check(
        &GOOD.replace("concurrency = 1", "concurency = 1"),
        expect![[r#"
            maru.toml:9:1: `service.hello.concurency`: unknown field `concurency`, expected one of `component`, `routes`, `hosts`, `instances`, `concurrency`, `idle_timeout`, `anomaly_warm_up`, `memory`, `timeout`, `startup_timeout`, `queue`, `body_limit`, `outbound`, `env`, `command`, `workdir`, `writable`, `user`, `store_bucket`, `ready`, `liveness`, `stop_signal`, `stop_timeout`, `cpu_time`, `scaling`, `trigger`, `purposes`, `isolation`, `placement`
              hint: remove the field or fix its spelling; docs/manifest.md lists every field"#]],
    );
}

#[test]
fn wrong_type_names_line_and_field() {
    check(
        &GOOD.replace("memory = \"64MiB\"", "memory = 64"),
        expect![[r#"
            maru.toml:11:10: `service.hello.memory`: invalid type: integer `64`, expected a string
              hint: see docs/manifest.md for the manifest format"#]],
    );
}

#[test]
fn bad_units_and_ranges() {
    check(
        &GOOD.replace("\"64MiB\"", "\"64 parsecs\""),
        expect![[r#"
            maru.toml:11:10: `service.hello.memory`: `parsecs` is not a size unit (use B, KiB, MiB, GiB, KB, MB or GB)
              hint: write a number with a unit: "512KiB", "64MiB", "1GiB""#]],
    );
    check(
        &GOOD.replace("\"64MiB\"", "\"64GiB\""),
        expect![[r#"
            maru.toml:11:10: `service.hello.memory`: 64GiB is out of range
              hint: use a size from 1MiB to 4GiB"#]],
    );
    check(
        &GOOD.replace("min = 0, max = 20", "min = 5, max = 2"),
        expect![[r#"
            maru.toml:8:13: `service.hello.instances`: min (5) is greater than max (2)
              hint: make min at most max"#]],
    );
    check(
        &GOOD.replace("max = 20", "max = 5000"),
        expect![[r#"
            maru.toml:8:30: `service.hello.instances.max`: 5000 is out of range
              hint: use a whole number from 1 to 1000"#]],
    );
    check(
        &GOOD.replace("\"10s\"", "\"10\""),
        expect![[r#"
            maru.toml:12:11: `service.hello.timeout`: `10` has no unit
              hint: write a number with a unit: "250ms", "30s", "5m", "1h""#]],
    );
    check(
        &GOOD.replace("concurrency = 1", "concurrency = 4"),
        expect![[r#"
            maru.toml:9:15: `service.hello.concurrency`: 4 is out of range
              hint: a wasi:http component instance serves one request at a time; raise instances.max to serve more at once"#]],
    );
}

#[test]
fn missing_component_and_bad_routes() {
    check(
        &GOOD.replace("component = \"hello.wasm\"\n", ""),
        expect![[r#"
            maru.toml:5:1: `service.hello.component`: the service has neither `component` nor `command`
              hint: add component = "path/to/service.wasm" (relative to this manifest), or command = ["program", "arg"] to run a program"#]],
    );
    check(
        &GOOD.replace("[\"/hello\"]", "[\"hello\"]"),
        expect![[r#"
            maru.toml:7:11: `service.hello.routes`: route `hello` does not start with /
              hint: write a path prefix such as "/api" or "/""#]],
    );
    check(
        &GOOD.replace("[\"/hello\"]", "[\"/a/../b\"]"),
        expect![[r#"
            maru.toml:7:11: `service.hello.routes`: route `/a/../b` contains a `.` or `..` segment
              hint: write a path prefix such as "/api" or "/""#]],
    );
    check(
        &format!("{GOOD}\n[service.other]\ncomponent = \"o.wasm\"\nroutes = [\"/hello/\"]\n"),
        expect![[r#"
            maru.toml:18:11: `service.other.routes`: route /hello/ is also claimed by service `hello` in this manifest
              hint: give each service its own path prefix or host"#]],
    );
}

#[test]
fn names_and_outbound() {
    check(
        &GOOD.replace("name = \"hello\"", "name = \"Hello World\""),
        expect![[r#"
            maru.toml:3:8: `app.name`: `Hello World` is not a valid name
              hint: use 1 to 63 lowercase letters, digits and dashes, starting with a letter"#]],
    );
    check(
        &GOOD.replace("https://api.example.org", "api.example.org"),
        expect![
            "maru.toml:13:13: `service.hello.outbound`: `api.example.org` is not an origin: the scheme is missing (write it as scheme://host[:port], e.g. https://api.example.org)"
        ],
    );
    check(
        "[app]\nname = \"x\"\n",
        expect![[r#"
            maru.toml:1:1: `service`: the app has no services
              hint: add a [service.NAME] table with at least `component` and `routes`"#]],
    );
    check(
        "[service.x]\ncomponent = \"x.wasm\"\n",
        expect![[r#"
            maru.toml:1:1: `app`: missing field `app`
              hint: start the manifest with [app] and name = "my-app""#]],
    );
}

const PROCESS: &str = r#"
[app]
name = "permits"

[service.registry]
command = ["python3", "app.py", "--port", "{port}"]
workdir = "legacy"
routes = ["/permits"]
concurrency = 8
ready = { http = "/healthz", timeout = "20s" }
liveness = { tcp = true, interval = "2s", failures = 2 }
stop_signal = "INT"
stop_timeout = "3s"
"#;

#[test]
fn process_services_parse_with_defaults() {
    check(
        PROCESS,
        expect![[
            r#"permits/registry: process ["python3", "app.py", "--port", "{port}"] in legacy ready=Http("/healthz")/20s liveness=Some(LivenessProbe { probe: Tcp, interval: 2s, timeout: 1s, failures: 2 }) stop=SIGINT/3s routes=["/permits"] hosts=[] instances=0..10 idle=30s memory=unlimited timeout=10s queue=1000 body=1MiB outbound= env={}"#
        ]],
    );
}

#[test]
fn process_fields_are_checked() {
    check(
        &PROCESS.replace("command = [", "component = \"x.wasm\"\ncommand = ["),
        expect![[r#"
            maru.toml:7:11: `service.registry.command`: a service has either `component` or `command`, not both
              hint: split it into two services"#]],
    );
    check(
        &PROCESS.replace("stop_signal = \"INT\"", "stop_signal = \"KILL\""),
        expect![[r#"
            maru.toml:12:15: `service.registry.stop_signal`: `KILL` is not a stop signal Maru sends
              hint: use one of SIGTERM, SIGINT, SIGQUIT, SIGHUP, SIGUSR1, SIGUSR2"#]],
    );
    check(
        &PROCESS.replace("concurrency = 8", "outbound = [\"https://x.org\"]"),
        expect![
            "maru.toml:9:13: `service.registry.outbound`: `outbound` applies to components; a process has the host's network"
        ],
    );
    check(
        &PROCESS.replace(
            "command = [\"python3\", \"app.py\", \"--port\", \"{port}\"]",
            "command = []",
        ),
        expect![[r#"
            maru.toml:6:11: `service.registry.command`: the command is empty
              hint: write command = ["program", "arg", ...]"#]],
    );
    check(
        &PROCESS.replace(
            "ready = { http = \"/healthz\", timeout = \"20s\" }",
            "ready = { http = \"/healthz\", tcp = true }",
        ),
        expect![
            "maru.toml:10:9: `service.registry.ready`: a probe needs exactly one of http = \"/path\" or tcp = true"
        ],
    );
    check(
        &PROCESS.replace("concurrency = 8", "user = \"-root\""),
        expect![[r#"
            maru.toml:9:8: `service.registry.user`: `-root` is not a user name
              hint: name an existing account, e.g. user = "nobody""#]],
    );
    check(
        &PROCESS.replace("concurrency = 8", "writable = [\"out\", \"\"]"),
        expect![[r#"
            maru.toml:9:12: `service.registry.writable`: `` is not a directory path
              hint: list directories, relative to this manifest or absolute: writable = ["data"]"#]],
    );
    check(
        &GOOD.replace("concurrency = 1", "writable = [\"out\"]"),
        expect![
            "maru.toml:9:12: `service.hello.writable`: `writable` applies to process services (with `command`), not components"
        ],
    );
    check(
        &GOOD.replace("concurrency = 1", "ready = { tcp = true }"),
        expect![
            "maru.toml:9:9: `service.hello.ready`: `ready` applies to process services (with `command`), not components"
        ],
    );
    check(
        "[app]\nname = \"a\"\n[service.web]\nroutes = [\"/\"]\n",
        expect![[r#"
            maru.toml:3:1: `service.web.component`: the service has neither `component` nor `command`
              hint: add component = "path/to/service.wasm" (relative to this manifest), or command = ["program", "arg"] to run a program"#]],
    );
}

#[test]
fn scaling_policies_parse_and_are_checked() {
    let with = |scaling: &str| GOOD.replace("concurrency = 1", scaling);
    let parsed = parse(
        "maru.toml",
        &with("scaling = { policy = \"hpa\", target = 0.6 }"),
    )
    .expect("hpa");
    assert_eq!(
        parsed.services["hello"].scaling,
        Scaling {
            policy: ScalingPolicy::Hpa,
            target_percent: Some(60),
            caution: CautionLevel::Normal,
            slo: None,
        }
    );
    let parsed = parse(
        "maru.toml",
        &with("scaling = { policy = \"predictive\", slo = \"200ms\", caution = \"conservative\" }"),
    )
    .expect("predictive");
    assert_eq!(
        parsed.services["hello"].scaling.caution,
        CautionLevel::Conservative
    );
    assert_eq!(
        parsed.services["hello"].scaling.slo,
        Some(Duration::from_millis(200))
    );
    let parsed = parse(
        "maru.toml",
        &with("scaling = { policy = \"predictive\", caution = 0.62 }"),
    )
    .expect("a tuned knob");
    assert_eq!(
        parsed.services["hello"].scaling.caution,
        CautionLevel::Knob(620)
    );
    check(
        &with("scaling = { policy = \"predictive\", caution = 1.5 }"),
        expect![[r#"
            maru.toml:9:46: `service.hello.scaling.caution`: 1.5 is out of range
              hint: a tuned knob from 0.05 (cautious) to 1.0 (bold), as `maru sim --tune` reports it"#]],
    );
    check(
        &with("scaling = { policy = \"predictive\", caution = true }"),
        expect![[r#"
            maru.toml:9:46: `service.hello.scaling`: `caution` is a level ("conservative", "normal", "aggressive") or a tuned knob from 0.05 to 1.0
              hint: see docs/manifest.md for the manifest format"#]],
    );
    check(
        &with("scaling = { policy = \"predictive\", caution = \"careful\" }"),
        expect![[r#"
            maru.toml:9:46: `service.hello.scaling.caution`: `careful` is not a caution level
              hint: use conservative, normal or aggressive, or a tuned knob from 0.05 to 1.0"#]],
    );
    assert_eq!(
        parse("maru.toml", GOOD).expect("default").services["hello"]
            .scaling
            .policy,
        ScalingPolicy::Reactive
    );
    check(
        &with("scaling = { policy = \"magic\" }"),
        expect![[r#"
            maru.toml:9:22: `service.hello.scaling.policy`: `magic` is not a scaling policy
              hint: use one of reactive, hpa, kpa, aws-predictive, predictive"#]],
    );
    check(
        &with("scaling = { policy = \"predictive\", target = 0.5 }"),
        expect![
            "maru.toml:9:45: `service.hello.scaling.target`: `target` applies to hpa, kpa and aws-predictive, not predictive"
        ],
    );
    check(
        &with("scaling = { policy = \"kpa\", target = 1.5 }"),
        expect![[r#"
            maru.toml:9:38: `service.hello.scaling.target`: 1.5 is out of range
              hint: a target utilisation from 0.05 to 1.0"#]],
    );
    check(
        &with("scaling = { policy = \"hpa\", slo = \"fast\" }"),
        expect![[r#"
            maru.toml:9:35: `service.hello.scaling.slo`: `fast` is not a duration
              hint: write a number with a unit: "250ms", "30s", "5m", "1h""#]],
    );
    check(
        &with("scaling = { slo = \"2h\" }"),
        expect![[r#"
        maru.toml:9:19: `service.hello.scaling.slo`: 2h is out of range
          hint: use a value from 1ms to 3600s"#]],
    );
}

#[test]
fn error_at_points_to_the_field_or_its_table() {
    let app = parse("m.toml", GOOD).expect("good manifest");
    assert_eq!(
        app.error_at("service.hello.component", "gone", None)
            .to_string(),
        "m.toml:6:13: `service.hello.component`: gone"
    );
    assert_eq!(app.error_at("service.hello.nothing", "x", None).line, 5);
}

#[test]
fn change_detection_names_fields() {
    let a = parse("m.toml", GOOD).expect("good");
    let b = parse(
        "m.toml",
        &GOOD
            .replace("64MiB", "128MiB")
            .replace("\"/hello\"", "\"/hi\""),
    )
    .expect("good");
    assert_eq!(
        a.services["hello"].changed_fields(&b.services["hello"]),
        ["routes", "memory"]
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Whatever the bytes, parsing returns a result and any error points inside the text.
    #[test]
    fn never_panics_on_arbitrary_text(text in "\\PC{0,200}") {
        if let Err(error) = parse("f.toml", &text) {
            prop_assert!(error.line >= 1 && error.line <= text.lines().count().max(1) + 1);
        }
    }

    /// Deleting, duplicating or replacing a span of a valid manifest never panics, and a
    /// rejected mutation is located within the file.
    #[test]
    fn mutated_manifests_fail_cleanly(start in 0..GOOD.len(), len in 0usize..12, insert in "[\\[\\]={}\",.a-z0-9 \n]{0,6}") {
        let end = (start + len).min(GOOD.len());
        if GOOD.is_char_boundary(start) && GOOD.is_char_boundary(end) {
            let text = format!("{}{}{}", &GOOD[..start], insert, &GOOD[end..]);
            if let Err(error) = parse("f.toml", &text) {
                prop_assert!(error.line >= 1 && error.line <= text.lines().count() + 1, "{error}");
                prop_assert!(!error.message.is_empty());
            }
        }
    }
}

#[test]
fn durations_and_sizes() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert!(parse_duration("-1s").is_err());
    assert!(parse_duration("99999999999999999999h").is_err());
    assert_eq!(parse_size("1GiB"), Ok(1 << 30));
    assert_eq!(parse_size("100MB"), Ok(100_000_000));
    assert!(parse_size("18446744073709551615GiB").is_err());
}

/// Parse `text` and render its topics and triggers, or the error.
fn check_events(text: &str, expect: Expect) {
    let actual = match parse("maru.toml", text) {
        Ok(app) => {
            let mut lines: Vec<String> = app
                .topics
                .iter()
                .map(|(name, t)| format!("topic {name}: {t:?}"))
                .collect();
            for (name, service) in &app.services {
                for trigger in &service.triggers {
                    lines.push(format!("{name} <- {trigger:?}"));
                }
            }
            lines.join("\n")
        }
        Err(error) => error.to_string(),
    };
    expect.assert_eq(&actual);
}

const EVENTS: &str = r#"
[app]
name = "traffic"

[topic."city.traffic"]
durability = "batch"
sync_window = "50ms"
retention = "2d"
retention_size = "10GiB"
event_limit = "64KiB"

[topic."city.congestion"]

[service.flow]
component = "traffic.wasm"
instances = { max = 4 }

[[service.flow.trigger]]
topic = "city.traffic"
batch = 100
path = "/loops?window=60"
reply_to = "city.congestion"
"#;

#[test]
fn topics_and_triggers_parse_with_defaults() {
    check_events(
        EVENTS,
        expect![[r#"
            topic city.congestion: TopicManifest { batch_window: None, retention: 604800s, retention_bytes: 1073741824, event_bytes_max: 1048576, segment_bytes: 67108864, labels: DataLabels { classification: Internal, region: None, allowed_purposes: [] } }
            topic city.traffic: TopicManifest { batch_window: Some(50ms), retention: 172800s, retention_bytes: 10737418240, event_bytes_max: 65536, segment_bytes: 67108864, labels: DataLabels { classification: Internal, region: None, allowed_purposes: [] } }
            flow <- TriggerManifest { topic: "city.traffic", batch: 100, parallel: 4, path: "/loops?window=60", max_attempts: 5, dead_letter: None, reply_to: Some("city.congestion"), pseudonymise: [] }"#]],
    );
}

#[test]
fn topic_and_trigger_mistakes_name_line_and_field() {
    check_events(
        &EVENTS.replace("durability = \"batch\"", "durability = \"sometimes\""),
        expect![[r#"
            maru.toml:6:14: `topic.city.traffic.durability`: `sometimes` is not a durability
              hint: use "fsync" (acknowledge after fsync) or "batch" (acknowledge after write, fsync every sync_window)"#]],
    );
    check_events(
        &EVENTS.replace("[topic.\"city.congestion\"]", "[topic.\"City Congestion\"]"),
        expect![[
            r#"maru.toml:12:1: `topic.City Congestion`: "City Congestion" is not a valid topic name: use 1 to 128 of a-z, 0-9, '.', '_' and '-', starting with a letter or digit"#
        ]],
    );
    check_events(
        &EVENTS.replace(
            "reply_to = \"city.congestion\"",
            "reply_to = \"city.elsewhere\"",
        ),
        expect![[r#"
            maru.toml:22:12: `service.flow.trigger.reply_to`: topic `city.elsewhere` is not declared in this manifest
              hint: add a [topic."city.elsewhere"] table"#]],
    );
    check_events(
        &EVENTS.replace("batch = 100", "batch = 0"),
        expect![[r#"
            maru.toml:20:9: `service.flow.trigger.batch`: 0 is out of range
              hint: use a whole number from 1 to 1000"#]],
    );
    check_events(
        &EVENTS
            .replace("sync_window = \"50ms\"\n", "")
            .replace("durability = \"batch\"", "sync_window = \"1s\""),
        expect![[
            r#"maru.toml:6:15: `topic.city.traffic.sync_window`: `sync_window` applies to durability = "batch""#
        ]],
    );
    check_events(
        &EVENTS.replace(
            "topic = \"city.traffic\"\nbatch",
            "topic = \"city.traffic\"\ntopic = \"x\"\nbatch",
        ),
        expect![[r#"
            maru.toml:20:1: `service.flow.trigger.topic`: duplicate key
              hint: see docs/manifest.md for the manifest format"#]],
    );
    check_events(
        &format!("{EVENTS}\n[[service.flow.trigger]]\ntopic = \"city.traffic\"\n"),
        expect![[r#"
            maru.toml:25:9: `service.flow.trigger.topic`: the service already has a trigger on topic city.traffic
              hint: one trigger per topic: raise its `parallel` or `batch` instead"#]],
    );
    check_events(
        &EVENTS.replace("instances = { max = 4 }", "routes = [\"/events/x\"]"),
        expect![[r#"
            maru.toml:16:11: `service.flow.routes`: route `/events/x` is under /events, where the gateway takes events for topics
              hint: write a path prefix such as "/api" or "/""#]],
    );
}

#[test]
fn key_value_buckets_parse_with_defaults_and_limits() {
    let app = parse(
        "maru.toml",
        &format!("{GOOD}\n[kv.bookings]\nvalue_bytes_max = \"4KiB\"\n\n[kv.counters]\n"),
    )
    .expect("parses");
    assert_eq!(
        app.kv.get("bookings"),
        Some(&KvManifest {
            key_bytes_max: 512,
            value_bytes_max: 4096,
            total_bytes_max: 64 << 20,
            labels: DataLabels::default(),
        })
    );
    assert_eq!(app.kv["counters"].value_bytes_max, 1 << 20);
    let refused = |extra: &str| {
        parse("maru.toml", &format!("{GOOD}\n{extra}"))
            .expect_err("refused")
            .to_string()
    };
    expect![[r#"
        maru.toml:17:19: `kv.bookings.value_bytes_max`: 32MiB is out of range
          hint: use a size from 1B to 16MiB"#]]
    .assert_eq(&refused("[kv.bookings]\nvalue_bytes_max = \"32MiB\"\n"));
    expect![[r#"
        maru.toml:16:1: `kv.Bookings`: `Bookings` is not a valid name
          hint: use 1 to 63 lowercase letters, digits and dashes, starting with a letter"#]]
    .assert_eq(&refused("[kv.Bookings]\n"));
}

#[test]
fn data_labels_purposes_and_pseudonymised_fields_parse_and_are_checked() {
    let text = r#"
[app]
name = "traffic"
organisation = "transport"

[topic."city.movements"]
classification = "personal"
region = "eu-central"
allowed_purposes = ["traffic-signal-control"]

[topic."city.traffic"]
classification = "public"

[kv.trips]
classification = "personal"
allowed_purposes = ["billing", "traffic-signal-control"]

[bucket."traffic-archive"]
classification = "internal"

[service.signals]
component = "signals.wasm"
purposes = ["traffic-signal-control"]

[[service.signals.trigger]]
topic = "city.movements"
pseudonymise = ["plate", "vehicle.id"]
"#;
    let app = parse("maru.toml", text).expect("parses");
    assert_eq!(app.organisation.as_deref(), Some("transport"));
    let movements = &app.topics["city.movements"].labels;
    assert_eq!(movements.classification, Classification::Personal);
    assert_eq!(movements.region.as_deref(), Some("eu-central"));
    assert_eq!(movements.allowed_purposes, ["traffic-signal-control"]);
    assert_eq!(
        app.topics["city.traffic"].labels.classification,
        Classification::Public
    );
    assert_eq!(app.kv["trips"].labels.allowed_purposes.len(), 2);
    assert_eq!(app.kv["trips"].labels.region, None, "the node's region");
    assert_eq!(app.buckets["traffic-archive"], DataLabels::default());
    let signals = &app.services["signals"];
    assert_eq!(signals.purposes, ["traffic-signal-control"]);
    assert_eq!(signals.triggers[0].pseudonymise, ["plate", "vehicle.id"]);

    let refused = |from: &str, to: &str| {
        assert!(text.contains(from), "{from}");
        parse("maru.toml", &text.replacen(from, to, 1))
            .expect_err("refused")
            .to_string()
    };
    expect![[r#"
        maru.toml:7:18: `topic.city.movements.classification`: `secret` is not a classification
          hint: use "public", "internal" (the default) or "personal""#]]
    .assert_eq(&refused(
        r#"classification = "personal""#,
        r#"classification = "secret""#,
    ));
    expect![[r#"
        maru.toml:6:1: `topic.city.movements.allowed_purposes`: personal data needs the purposes it may be used for
          hint: add allowed_purposes = ["..."]: only services declaring one of them may use it"#]]
    .assert_eq(&refused(r#"allowed_purposes = ["traffic-signal-control"]"#, ""));
    expect![[r#"
        maru.toml:16:20: `kv.trips.allowed_purposes`: `allowed_purposes` applies to personal data
          hint: set classification = "personal", or remove allowed_purposes"#]]
    .assert_eq(&refused(
        "[kv.trips]\nclassification = \"personal\"",
        "[kv.trips]\nclassification = \"internal\"",
    ));
    expect![[r#"
        maru.toml:9:20: `topic.city.movements.allowed_purposes`: `Traffic` is not a label: use 1 to 63 lowercase letters, digits and `-`, starting with a letter
          hint: purposes are names such as "traffic-signal-control""#]]
    .assert_eq(&refused(
        r#"allowed_purposes = ["traffic-signal-control"]"#,
        r#"allowed_purposes = ["Traffic"]"#,
    ));
    expect!["maru.toml:23:12: `service.signals.purposes`: `a` is listed twice"].assert_eq(
        &refused(
            "\npurposes = [\"traffic-signal-control\"]",
            "\npurposes = [\"a\", \"a\"]",
        ),
    );
    expect![[r#"
        maru.toml:4:16: `app.organisation`: `Transport Dept` is not a label: use 1 to 63 lowercase letters, digits and `-`, starting with a letter
          hint: an organisation is a name such as "transport""#]]
    .assert_eq(&refused(r#""transport""#, r#""Transport Dept""#));
    expect![[r#"
        maru.toml:27:16: `service.signals.trigger.pseudonymise`: `vehicle.` is not a field name
          hint: name a JSON field of the events, or a dotted path into nested objects: "plate", "vehicle.id""#]]
    .assert_eq(&refused(r#""vehicle.id""#, r#""vehicle.""#));
}

#[test]
fn isolation_is_instance_or_request_for_components_only() {
    let with = |extra: &str| parse("maru.toml", &format!("{GOOD}{extra}"));
    let base = with("").expect("parses");
    assert!(!base.services.values().any(|s| s.fresh_instance_per_request));
    let text =
        "[app]\nname = \"a\"\n\n[service.s]\ncomponent = \"s.wasm\"\nisolation = \"request\"\n";
    let app = parse("maru.toml", text).expect("parses");
    assert!(app.services["s"].fresh_instance_per_request);
    expect![[r#"
        maru.toml:6:13: `service.s.isolation`: `none` is not an isolation
          hint: use "instance" (the default: an instance serves one request after another) or "request" (a fresh instance for every request)"#]].assert_eq(
        &parse("maru.toml", &text.replace("\"request\"", "\"none\""))
            .expect_err("refused")
            .to_string(),
    );
    let process =
        "[app]\nname = \"a\"\n\n[service.s]\ncommand = [\"true\"]\nisolation = \"request\"\n";
    expect!["maru.toml:6:13: `service.s.isolation`: `isolation` applies to components; a process keeps its own state"].assert_eq(
        &parse("maru.toml", process)
            .expect_err("refused")
            .to_string(),
    );
}

#[test]
fn placement_names_a_region_a_spread_and_an_edge_rule() {
    let text = |placement: &str| {
        format!("[app]\nname = \"a\"\n\n[service.s]\ncomponent = \"s.wasm\"\n{placement}")
    };
    let plain = parse("maru.toml", &text("")).expect("parses");
    assert_eq!(plain.services["s"].placement, Placement::default());
    assert_eq!(plain.services["s"].placement.spread, Spread::Zone);
    assert_eq!(plain.services["s"].placement.edge, EdgeRule::Allowed);
    let app = parse(
        "maru.toml",
        &text("placement = { region = \"seoul\", spread = \"node\", edge = \"never\" }\n"),
    )
    .expect("parses");
    assert_eq!(
        app.services["s"].placement,
        Placement {
            region: Some("seoul".into()),
            spread: Spread::Node,
            edge: EdgeRule::Never,
        }
    );
    let only = parse("maru.toml", &text("placement = { edge = \"only\" }\n")).expect("parses");
    assert_eq!(only.services["s"].placement.edge, EdgeRule::Only);
    assert_eq!(
        only.services["s"].changed_fields(&plain.services["s"]),
        vec!["placement"]
    );
    let refused = |placement: &str| {
        parse("maru.toml", &text(placement))
            .expect_err("refused")
            .to_string()
    };
    expect![[r#"
        maru.toml:6:24: `service.s.placement.spread`: `rack` is not a spread
          hint: use "zone" (the default: over zones, then nodes) or "node""#]]
    .assert_eq(&refused("placement = { spread = \"rack\" }\n"));
    expect![[r#"
        maru.toml:6:22: `service.s.placement.edge`: `sometimes` is not an edge rule
          hint: use "allowed" (the default), "only" or "never""#]]
    .assert_eq(&refused("placement = { edge = \"sometimes\" }\n"));
    assert!(
        refused("placement = { zone = \"a\" }\n").contains("unknown field `zone`"),
        "{}",
        refused("placement = { zone = \"a\" }\n")
    );
}
