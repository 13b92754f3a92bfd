//! `maru admin init`, `maru login|logout|whoami`, `maru tokens`, `maru operators`: who
//! operates a node, and the tokens the CLI and machines use.
//!
//! A login's token is kept for the CLI in `sessions.json` (mode 0600, directory 0700) under
//! `MARU_CONFIG_DIR`, else `$XDG_CONFIG_HOME/maru`, else `~/.config/maru`, one per control
//! API address.

use std::collections::BTreeMap;
use std::io::{BufRead as _, IsTerminal as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::PathBuf;

use anyhow::Context as _;
use maru_api::{
    CreateOperatorRequest, CreateTokenRequest, Enrolment, LoginRequest, TokenInfo, WhoAmI,
};
use serde::{Deserialize, Serialize};

use crate::Target;
use crate::client::{Client, print_json};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Session {
    pub token: String,
    pub subject: String,
    pub expires_unix_ms: u64,
}

fn config_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("MARU_CONFIG_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME") {
        return Some(PathBuf::from(dir).join("maru"));
    }
    std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".config").join("maru"))
}

fn sessions_path() -> Option<PathBuf> {
    config_dir().map(|dir| dir.join("sessions.json"))
}

fn read_sessions() -> BTreeMap<String, Session> {
    sessions_path()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

fn write_sessions(sessions: &BTreeMap<String, Session>) -> anyhow::Result<()> {
    let dir =
        config_dir().context("no HOME, XDG_CONFIG_HOME or MARU_CONFIG_DIR to keep the login in")?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("sessions.json");
    let tmp = dir.join(format!(".sessions.json.{}", std::process::id()));
    {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("write {}", tmp.display()))?;
        std::io::Write::write_all(
            &mut file,
            serde_json::to_string_pretty(sessions)?.as_bytes(),
        )?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

/// The CLI's login token for the control API at `base`, if it has an unexpired one.
pub fn session_token(base: &str) -> Option<String> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    read_sessions()
        .remove(base)
        .filter(|s| s.expires_unix_ms > now)
        .map(|s| s.token)
}

/// A secret from the first line of standard input (`--password-stdin`), else asked for on
/// the terminal without echo.
fn secret(prompt: &str, from_stdin: bool) -> anyhow::Result<String> {
    if from_stdin || !std::io::stdin().is_terminal() {
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line)?;
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        anyhow::ensure!(!line.is_empty(), "no {prompt} on standard input");
        return Ok(line);
    }
    rpassword::prompt_password(format!("{prompt}: ")).context("read from the terminal")
}

fn line(prompt: &str) -> anyhow::Result<String> {
    if std::io::stdin().is_terminal() {
        eprint!("{prompt}: ");
    }
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    Ok(line.trim().to_string())
}

fn print_enrolment(enrolment: &Enrolment) -> anyhow::Result<()> {
    println!(
        "operator {} created with roles {}",
        enrolment.name,
        enrolment.roles.join(", ")
    );
    println!("Add this TOTP secret to an authenticator app (shown only now):");
    println!();
    if let Ok(code) = qrcode::QrCode::new(enrolment.otpauth_url.as_bytes()) {
        let image = code
            .render::<qrcode::render::unicode::Dense1x2>()
            .dark_color(qrcode::render::unicode::Dense1x2::Light)
            .light_color(qrcode::render::unicode::Dense1x2::Dark)
            .build();
        println!("{image}");
    }
    println!("  {}", enrolment.otpauth_url);
    println!("  secret (base32): {}", enrolment.secret);
    println!();
    println!(
        "Then: maru login --name {} (password, then the app's current code)",
        enrolment.name
    );
    Ok(())
}

/// `maru admin init`: the first operator, with the node's bootstrap token.
pub fn admin_init(target: &Target, name: &str, password_stdin: bool) -> anyhow::Result<()> {
    let password = secret("password for the new operator", password_stdin)?;
    if !password_stdin && std::io::stdin().is_terminal() {
        let again = secret("the same password again", false)?;
        anyhow::ensure!(again == password, "the passwords differ");
    }
    let enrolment: Enrolment = Client::new(target)?.post(
        "create the first operator",
        "/v1/admin/init",
        &CreateOperatorRequest {
            name: name.into(),
            password,
            roles: Vec::new(),
        },
    )?;
    if target.json {
        return print_json(&enrolment);
    }
    print_enrolment(&enrolment)?;
    println!("The node's bootstrap token (DATA/token) no longer works.");
    Ok(())
}

/// `maru operators create`.
pub fn create_operator(
    target: &Target,
    name: &str,
    roles: Vec<String>,
    password_stdin: bool,
) -> anyhow::Result<()> {
    let password = secret("password for the new operator", password_stdin)?;
    let enrolment: Enrolment = Client::new(target)?.post(
        "create an operator",
        "/v1/operators",
        &CreateOperatorRequest {
            name: name.into(),
            password,
            roles,
        },
    )?;
    if target.json {
        return print_json(&enrolment);
    }
    print_enrolment(&enrolment)
}

/// `maru login`: password and TOTP code for a token the CLI keeps.
pub fn login(
    target: &Target,
    name: &str,
    code: Option<String>,
    password_stdin: bool,
    ttl_seconds: Option<u64>,
) -> anyhow::Result<()> {
    let password = secret("password", password_stdin)?;
    let code = match code {
        Some(code) => code,
        None => line("TOTP code")?,
    };
    let client = Client::anonymous(target)?;
    let token: TokenInfo = client.post(
        "log in",
        "/v1/login",
        &LoginRequest {
            name: name.into(),
            password,
            code,
            ttl_seconds,
        },
    )?;
    let secret = token
        .token
        .clone()
        .context("the node answered a login without a token")?;
    let mut sessions = read_sessions();
    sessions.insert(
        client.base().to_string(),
        Session {
            token: secret,
            subject: token.subject.clone(),
            expires_unix_ms: token.expires_unix_ms,
        },
    );
    write_sessions(&sessions)?;
    if target.json {
        let mut shown = token;
        shown.token = None;
        return print_json(&shown);
    }
    println!(
        "logged in as {} (roles {}) until {} UTC; token {} kept in {}",
        token.subject,
        token.roles.join(", "),
        crate::audit_cli::utc(token.expires_unix_ms),
        token.id,
        sessions_path()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    Ok(())
}

/// `maru logout`: revoke the CLI's token and forget it.
pub fn logout(target: &Target) -> anyhow::Result<()> {
    let client = Client::new(target)?;
    let revoked: TokenInfo = client.post("log out", "/v1/logout", &serde_json::json!({}))?;
    let mut sessions = read_sessions();
    sessions.remove(client.base());
    write_sessions(&sessions)?;
    println!("logged out: token {} revoked", revoked.id);
    Ok(())
}

pub fn whoami(target: &Target) -> anyhow::Result<()> {
    let me: WhoAmI = Client::new(target)?.get("whoami", "/v1/whoami")?;
    if target.json {
        return print_json(&me);
    }
    println!(
        "{} (roles {}){}",
        me.subject,
        me.roles.join(", "),
        me.expires_unix_ms
            .map(|ms| format!(
                ", token {} until {} UTC",
                me.token_id.clone().unwrap_or_default(),
                crate::audit_cli::utc(ms)
            ))
            .unwrap_or_else(|| ", the node's bootstrap token".into())
    );
    Ok(())
}

/// A duration like `30d`, `12h`, `90m`, `45s`.
fn parse_ttl(text: &str) -> anyhow::Result<u64> {
    let (number, unit) = text.split_at(
        text.trim_end_matches(|c: char| c.is_ascii_alphabetic())
            .len(),
    );
    let number: u64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("{text:?} is not a duration like 30d, 12h, 90m or 45s"))?;
    let seconds = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("{text:?} is not a duration like 30d, 12h, 90m or 45s"),
    };
    Ok(number.saturating_mul(seconds))
}

pub fn create_token(
    target: &Target,
    name: &str,
    roles: Vec<String>,
    ttl: &str,
    description: String,
) -> anyhow::Result<()> {
    let token: TokenInfo = Client::new(target)?.post(
        "create a token",
        "/v1/tokens",
        &CreateTokenRequest {
            name: name.into(),
            roles,
            ttl_seconds: parse_ttl(ttl)?,
            description,
        },
    )?;
    if target.json {
        return print_json(&token);
    }
    println!(
        "token {} for {} (roles {}) until {} UTC; the secret, shown only now:",
        token.id,
        token.subject,
        token.roles.join(", "),
        crate::audit_cli::utc(token.expires_unix_ms)
    );
    println!("{}", token.token.unwrap_or_default());
    Ok(())
}

pub fn list_tokens(target: &Target) -> anyhow::Result<()> {
    let tokens: Vec<TokenInfo> = Client::new(target)?.get("list tokens", "/v1/tokens")?;
    if target.json {
        return print_json(&tokens);
    }
    println!(
        "{:<18} {:<24} {:<24} {:<23} STATE",
        "ID", "SUBJECT", "ROLES", "EXPIRES (UTC)"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    for token in tokens {
        let state = if token.revoked {
            "revoked"
        } else if token.expires_unix_ms <= now {
            "expired"
        } else {
            "valid"
        };
        println!(
            "{:<18} {:<24} {:<24} {:<23} {state}",
            token.id,
            token.subject,
            token.roles.join(","),
            crate::audit_cli::utc(token.expires_unix_ms)
        );
    }
    Ok(())
}

pub fn revoke_token(target: &Target, id: &str) -> anyhow::Result<()> {
    let client = Client::new(target)?;
    let revoked: TokenInfo = client.delete("revoke a token", &format!("/v1/tokens/{id}"))?;
    println!("token {} ({}) revoked", revoked.id, revoked.subject);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_ttl("30d").expect("ok"), 30 * 86_400);
        assert_eq!(parse_ttl("90m").expect("ok"), 5400);
        assert_eq!(parse_ttl("45").expect("ok"), 45);
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
    }
}
