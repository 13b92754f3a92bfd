//! Operators, MFA and tokens through a real node and the CLI, with TOTP codes computed by
//! Debian's `oathtool` (RFC 6238), not by Maru's code.

use std::process::{Command, Output};

use crate::harness::{Node, hello_manifest};

const PASSWORD: &str = "correct horse battery staple";

fn code(secret: &str) -> String {
    let output = Command::new("oathtool")
        .args(["--totp", "-b", secret])
        .output()
        .expect("run oathtool (xtask installs it)");
    assert!(output.status.success(), "oathtool failed");
    String::from_utf8_lossy(&output.stdout).trim().to_string()
}

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn ok(output: Output) -> String {
    assert!(output.status.success(), "{}", text(&output));
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn enrol(node: &Node, args: &[&str]) -> String {
    let stdout = ok(node.cli_input(args, &format!("{PASSWORD}\n"), &[]));
    let enrolment: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert!(
        enrolment["otpauth_url"]
            .as_str()
            .expect("url")
            .starts_with("otpauth://totp/Maru:"),
        "{enrolment}"
    );
    enrolment["secret"].as_str().expect("secret").to_string()
}

fn login(node: &Node, name: &str, password: &str, code: &str) -> Output {
    node.cli_input(
        &["login", "--name", name, "--password-stdin", "--code", code],
        &format!("{password}\n"),
        &[],
    )
}

#[test]
fn admin_init_totp_login_deploy_and_the_bootstrap_token_retires() {
    let node = Node::start();
    let bootstrap = std::fs::read_to_string(node.data.join("token")).expect("token");
    let bootstrap = bootstrap.trim();
    // Before any operator, the bootstrap token deploys as it always did.
    node.deploy("hello.toml", &hello_manifest("before"));

    let secret = enrol(
        &node,
        &[
            "admin",
            "init",
            "--name",
            "ana",
            "--password-stdin",
            "--json",
        ],
    );
    // The bootstrap token now does nothing, over the CLI or the API.
    let refused = node.cli(&["apps"]);
    assert!(!refused.status.success(), "{}", text(&refused));
    assert!(text(&refused).contains("maru login"), "{}", text(&refused));
    let api = node.control_api("GET", "/v1/apps", Some(bootstrap), None);
    assert_eq!(api.status, 403);
    let again = node.cli_input(
        &["admin", "init", "--name", "eve", "--password-stdin"],
        &format!("{PASSWORD}\n"),
        &[],
    );
    assert!(!again.status.success());

    let first = code(&secret);
    ok(login(&node, "ana", PASSWORD, &first));
    let whoami = ok(node.cli(&["whoami"]));
    assert!(
        whoami.contains("operator:ana") && whoami.contains("admin"),
        "{whoami}"
    );
    node.deploy("hello.toml", &hello_manifest("after"));
    let sessions = node.data.with_file_name("cli-config").join("sessions.json");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&sessions)
            .expect("sessions")
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);

    // The same code again is a replay: refused, even with the right password.
    let replay = login(&node, "ana", PASSWORD, &first);
    assert!(!replay.status.success(), "{}", text(&replay));
    assert!(text(&replay).contains("(401)"), "{}", text(&replay));
    // A wrong password, an unknown name: the same answer.
    let wrong = login(&node, "ana", "not the password at all", &code(&secret));
    assert!(text(&wrong).contains("(401)"), "{}", text(&wrong));
    let nobody = login(&node, "nobody", PASSWORD, "123456");
    assert!(text(&nobody).contains("(401)"), "{}", text(&nobody));
    let logins: Vec<serde_json::Value> = serde_json::from_str(&ok(
        node.cli(&["audit", "search", "--action", "login", "--json"])
    ))
    .expect("JSON");
    let decisions: Vec<&str> = logins
        .iter()
        .map(|e| e["decision"].as_str().expect("decision"))
        .collect();
    assert_eq!(decisions, ["allow", "deny", "deny", "deny"], "{logins:?}");
    let audit = ok(node.cli(&["audit", "search", "--action", "login"]));
    assert!(
        !audit.contains(PASSWORD) && !audit.contains(&first),
        "{audit}"
    );

    // Logging out revokes the token at once; the CLI then has only the retired one.
    ok(node.cli(&["logout"]));
    let after = node.cli(&["apps"]);
    assert!(!after.status.success());
}

#[test]
fn machine_tokens_are_scoped_expire_and_revoke_and_guessing_is_throttled() {
    let node = Node::start();
    let secret = enrol(
        &node,
        &[
            "admin",
            "init",
            "--name",
            "ana",
            "--password-stdin",
            "--json",
        ],
    );
    ok(login(&node, "ana", PASSWORD, &code(&secret)));

    let created: serde_json::Value = serde_json::from_str(&ok(node.cli(&[
        "tokens", "create", "--name", "ci", "--role", "deployer", "--ttl", "1h", "--json",
    ])))
    .expect("JSON");
    let ci = created["token"].as_str().expect("token").to_string();
    let ci_id = created["id"].as_str().expect("id").to_string();
    let as_ci = |args: &[&str]| {
        node.cli_command(args)
            .env("MARU_TOKEN", &ci)
            .output()
            .expect("cli")
    };
    node.manifest("hello.toml", &hello_manifest("ci"));
    let path = node.data.with_file_name("hello.toml");
    ok(as_ci(&["deploy", path.to_str().expect("utf-8")]));
    // Out of scope: a deployer may not manage store keys or read the audit log.
    let keys = as_ci(&["store", "keys", "list"]);
    assert!(text(&keys).contains("(403)"), "{}", text(&keys));
    let audit = as_ci(&["audit", "tail"]);
    assert!(text(&audit).contains("(403)"), "{}", text(&audit));
    // Minting a token with more rights than its creator.
    let mint = as_ci(&["tokens", "create", "--name", "escalate", "--role", "admin"]);
    assert!(text(&mint).contains("(403)"), "{}", text(&mint));
    // Revoked: refused from the next request on.
    ok(node.cli(&["tokens", "revoke", &ci_id]));
    let revoked = as_ci(&["apps"]);
    assert!(text(&revoked).contains("(401)"), "{}", text(&revoked));
    // Expired.
    let short: serde_json::Value = serde_json::from_str(&ok(node.cli(&[
        "tokens", "create", "--name", "brief", "--role", "viewer", "--ttl", "1s", "--json",
    ])))
    .expect("JSON");
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let expired = node
        .cli_command(&["apps"])
        .env("MARU_TOKEN", short["token"].as_str().expect("token"))
        .output()
        .expect("cli");
    assert!(text(&expired).contains("(401)"), "{}", text(&expired));
    let listed = ok(node.cli(&["tokens", "list"]));
    assert!(
        listed.contains("revoked") && listed.contains("expired"),
        "{listed}"
    );

    // Guessing: after five wrong passwords the account (and the address) must wait, even
    // for the right password and code.
    let bob_secret = enrol(
        &node,
        &[
            "operators",
            "create",
            "--name",
            "bob",
            "--role",
            "viewer",
            "--password-stdin",
            "--json",
        ],
    );
    for _ in 0..5 {
        let wrong = login(&node, "bob", "a wrong guess, again", "000000");
        assert!(text(&wrong).contains("(401)"), "{}", text(&wrong));
    }
    let throttled = login(&node, "bob", PASSWORD, &code(&bob_secret));
    assert!(text(&throttled).contains("(429)"), "{}", text(&throttled));
    assert!(
        text(&throttled).contains("try again in"),
        "{}",
        text(&throttled)
    );
}

#[test]
fn cedar_policies_decide_validate_explain_and_fail_closed() {
    let node = Node::start();
    let secret = enrol(
        &node,
        &[
            "admin",
            "init",
            "--name",
            "ana",
            "--password-stdin",
            "--json",
        ],
    );
    ok(login(&node, "ana", PASSWORD, &code(&secret)));
    node.deploy("hello.toml", &hello_manifest("hi"));
    let dir = node.data.parent().expect("parent").to_path_buf();

    // The dry run explains the defaults.
    let test: serde_json::Value = serde_json::from_str(&ok(node.cli(&[
        "policy",
        "test",
        "--subject",
        "machine:ci",
        "--role",
        "deployer",
        "--action",
        "store.keys.create",
        "--resource",
        "store",
        "--json",
    ])))
    .expect("JSON");
    assert_eq!(test["allowed"], false, "{test}");
    let test: serde_json::Value = serde_json::from_str(&ok(node.cli(&[
        "policy",
        "test",
        "--subject",
        "machine:ci",
        "--role",
        "deployer",
        "--action",
        "apps.remove",
        "--resource",
        "app/hello",
        "--json",
    ])))
    .expect("JSON");
    assert_eq!(test["allowed"], true, "{test}");
    assert_eq!(test["policies"][0], "deployers", "{test}");

    // A policy set that does not validate is refused, and nothing changes.
    let bad = dir.join("bad.cedar");
    std::fs::write(
        &bad,
        "permit(principal, action == Maru::Action::\"apps.deploi\", resource);",
    )
    .expect("write");
    let refused = node.cli(&["policy", "set", bad.to_str().expect("utf-8")]);
    assert!(!refused.status.success());
    assert!(text(&refused).contains("(400)"), "{}", text(&refused));
    assert!(ok(node.cli(&["policy", "show"])).contains("deployers"));

    // Deployers may not remove the app `hello` any more.
    let mut stricter = String::from(policy::authz::DEFAULT_POLICIES);
    stricter.push_str(
        "\n@id(\"keep-hello\")\nforbid (principal in Maru::Role::\"deployer\", action == Maru::Action::\"apps.remove\", resource)\n  when { resource.name == \"hello\" };\n",
    );
    let file = dir.join("stricter.cedar");
    std::fs::write(&file, &stricter).expect("write");
    ok(node.cli(&["policy", "set", file.to_str().expect("utf-8")]));
    let created: serde_json::Value = serde_json::from_str(&ok(node.cli(&[
        "tokens", "create", "--name", "ci", "--role", "deployer", "--ttl", "1h", "--json",
    ])))
    .expect("JSON");
    let ci = created["token"].as_str().expect("token").to_string();
    let remove = node
        .cli_command(&["rm", "hello"])
        .env("MARU_TOKEN", &ci)
        .output()
        .expect("cli");
    assert!(text(&remove).contains("(403)"), "{}", text(&remove));
    assert!(text(&remove).contains("keep-hello"), "{}", text(&remove));
    let denials: Vec<serde_json::Value> = serde_json::from_str(&ok(node.cli(&[
        "audit",
        "search",
        "--action",
        "apps.remove",
        "--decision",
        "deny",
        "--json",
    ])))
    .expect("JSON");
    assert_eq!(denials.len(), 1, "{denials:?}");
    let changes = ok(node.cli(&["audit", "search", "--action", "policy.set"]));
    assert!(
        changes.contains("refused") && changes.contains("active"),
        "{changes}"
    );

    // A policy that errors while evaluated denies, although a permit applies, and says so.
    let erring = dir.join("erring.cedar");
    std::fs::write(
        &erring,
        "@id(\"admins\") permit(principal in Maru::Role::\"admin\", action, resource);\n@id(\"guard\") forbid(principal, action, resource) when { 9223372036854775807 + 1 > 0 };\n",
    )
    .expect("write");
    ok(node.cli(&["policy", "set", erring.to_str().expect("utf-8")]));
    let denied = node.cli(&["apps"]);
    assert!(text(&denied).contains("(403)"), "{}", text(&denied));
    assert!(
        text(&denied).contains("a policy failed"),
        "{}",
        text(&denied)
    );
    assert!(
        node.log().contains("ALERT: a Cedar policy failed"),
        "{}",
        node.log()
    );
}
