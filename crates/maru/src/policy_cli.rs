//! `maru policy show|set|test`: the node's Cedar policies (docs/policy.md).

use std::path::Path;

use anyhow::Context as _;
use maru_api::{PolicyDecision, PolicyTestRequest};

use crate::Target;
use crate::client::{Client, print_json};

pub fn show(target: &Target) -> anyhow::Result<()> {
    let client = Client::new(target)?;
    let text: String = client.finish_text(
        "read the policies",
        client
            .agent
            .get(client.url("/v1/policy"))
            .header("Authorization", client.auth())
            .call(),
    )?;
    print!("{text}");
    Ok(())
}

pub fn set(target: &Target, file: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("read the policies from {}", file.display()))?;
    let client = Client::new(target)?;
    client.finish_text(
        "set the policies",
        client
            .agent
            .put(client.url("/v1/policy"))
            .header("Authorization", client.auth())
            .header("Content-Type", "text/plain")
            .send(text.as_bytes()),
    )?;
    println!("policies from {} validated and active", file.display());
    Ok(())
}

pub fn test(
    target: &Target,
    subject: &str,
    roles: Vec<String>,
    action: &str,
    resource: &str,
    file: Option<&Path>,
) -> anyhow::Result<()> {
    let policies = match file {
        Some(file) => Some(
            std::fs::read_to_string(file)
                .with_context(|| format!("read the policies from {}", file.display()))?,
        ),
        None => None,
    };
    let decision: PolicyDecision = Client::new(target)?.post(
        "test the policies",
        "/v1/policy/test",
        &PolicyTestRequest {
            subject: subject.into(),
            roles,
            action: action.into(),
            resource: resource.into(),
            policies,
        },
    )?;
    if target.json {
        return print_json(&decision);
    }
    println!(
        "{}: {}",
        if decision.allowed { "ALLOW" } else { "DENY" },
        decision.reason
    );
    Ok(())
}
