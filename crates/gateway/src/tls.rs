//! TLS for the node's listeners (gateway, control API, MQTT, S3): rustls with ring (the
//! node's one cryptography provider), TLS 1.2 and 1.3 only, rustls's default cipher suites
//! (AES-GCM and ChaCha20-Poly1305 with ECDHE; nothing weaker exists in rustls).
//!
//! Certificates: the operator's own PEM files, or a node CA made at first start
//! (`DATA/tls/ca.pem`, its key `ca.key`) and a server certificate it signs
//! (`server.pem`, `server.key`) for `localhost`, the loopback addresses, the machine's host
//! name and the configured names. The server certificate is made again when the names
//! change or it has less than 30 days left; the CA stays, so clients that trust
//! `ca.pem` keep trusting the node. Files go through `disk::Disk` (mode 0600, each written
//! aside, synced and renamed), so a simulated power cut tests them: the CA's key and the
//! server certificate's `server.names` are each written last, so a start cut off while they
//! are made makes them again, never pairing a key with another certificate.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
pub use tokio_rustls::TlsAcceptor;

/// The server certificate's lifetime, and how long before its end it is renewed.
const SERVER_DAYS: i64 = 365;
const RENEW_DAYS: i64 = 30;
const CA_DAYS: i64 = 3650;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: PathBuf, message: String },
    #[error("making the node's certificates failed: {0}")]
    Generate(String),
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(String),
}

fn file_error(path: &Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Where the node's certificate comes from.
pub enum Source<'a> {
    /// The operator's PEM files: a certificate chain (leaf first) and its private key.
    Files {
        certificate: &'a Path,
        key: &'a Path,
    },
    /// The node CA in `dir`, made if missing, and a server certificate for these names.
    NodeCa { dir: &'a Path, names: &'a [String] },
}

/// The TLS side of the node's listeners.
pub struct NodeTls {
    pub acceptor: TlsAcceptor,
    /// The CA clients should trust (`None` with the operator's own files).
    pub ca: Option<PathBuf>,
    /// What was made at this start, for the operator to hear about.
    pub made: Vec<String>,
}

/// Load or make the node's certificate and the acceptor serving it.
pub fn node_tls(env: &disk::Env, source: Source<'_>) -> Result<NodeTls, TlsError> {
    let (chain, key, ca, made) = match source {
        Source::Files { certificate, key } => {
            let chain = certificates(env, certificate)?;
            if chain.is_empty() {
                return Err(file_error(certificate, "holds no PEM certificate"));
            }
            let pem = env.disk.read(key).map_err(|e| file_error(key, e))?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| file_error(key, e))?;
            (chain, key, None, Vec::new())
        }
        Source::NodeCa { dir, names } => {
            let (chain, key, made) = node_ca(env, dir, names)?;
            (chain, key, Some(dir.join("ca.pem")), made)
        }
    };
    let config = server_config(chain, key)?;
    Ok(NodeTls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        ca,
        made,
    })
}

/// A rustls server configuration: ring, TLS 1.2 and 1.3, HTTP/1.1 by ALPN when asked.
fn server_config(
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// The names a generated server certificate covers: loopback, the host name, and `extra`.
fn certificate_names(extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let host = host.trim().to_ascii_lowercase();
        if !host.is_empty() && !names.contains(&host) {
            names.push(host);
        }
    }
    for name in extra {
        if !names.contains(name) {
            names.push(name.clone());
        }
    }
    names
}

/// Every PEM certificate in a file.
fn certificates(env: &disk::Env, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = env.disk.read(path).map_err(|e| file_error(path, e))?;
    CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(path, e))
}

/// Written aside, synced and renamed into place, the directory synced (mode 0600).
fn write_private(env: &disk::Env, path: &Path, bytes: &[u8]) -> Result<(), TlsError> {
    disk::write_atomically(env.disk.as_ref(), path, bytes).map_err(|e| file_error(path, e))
}

fn generate(error: impl std::fmt::Display) -> TlsError {
    TlsError::Generate(error.to_string())
}

fn days(n: i64) -> Duration {
    Duration::from_secs(n.unsigned_abs() * 86_400)
}

/// The CA's parameters: the same every time, so its key can sign again after a restart.
fn ca_params(key: &rcgen::KeyPair) -> Result<rcgen::CertificateParams, TlsError> {
    use rcgen::PublicKeyData as _;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).map_err(generate)?;
    let id = blake3::hash(key.der_bytes()).to_hex();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("Maru node CA {}", &id[..12]),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Maru");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

/// The node CA's server certificate for `names` (made or renewed when needed).
fn node_ca(
    env: &disk::Env,
    dir: &Path,
    extra: &[String],
) -> Result<
    (
        Vec<CertificateDer<'static>>,
        PrivateKeyDer<'static>,
        Vec<String>,
    ),
    TlsError,
> {
    disk::create_dir_all(env.disk.as_ref(), dir).map_err(|e| file_error(dir, e))?;
    let mut made = Vec::new();
    let (ca_pem_path, ca_key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
    let now = time::OffsetDateTime::from_unix_timestamp((env.clock.now_ms() / 1000) as i64)
        .map_err(generate)?;
    let text = |path: &Path| -> Result<String, std::io::Error> {
        let bytes = env.disk.read(path)?;
        String::from_utf8(bytes).map_err(std::io::Error::other)
    };
    let ca_key = match text(&ca_key_path) {
        Ok(pem) => rcgen::KeyPair::from_pem(&pem).map_err(|e| file_error(&ca_key_path, e))?,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            let key = rcgen::KeyPair::generate().map_err(generate)?;
            let mut params = ca_params(&key)?;
            params.not_before = now;
            params.not_after = now + days(CA_DAYS);
            let certificate = params.self_signed(&key).map_err(generate)?;
            // The certificate first: cut off before the key, the next start finds no key
            // and makes the CA again; the key is the CA's commit.
            write_private(env, &ca_pem_path, certificate.pem().as_bytes())?;
            write_private(env, &ca_key_path, key.serialize_pem().as_bytes())?;
            made.push(format!(
                "a node CA ({}; clients trust it to reach this node)",
                ca_pem_path.display()
            ));
            key
        }
        Err(error) => return Err(file_error(&ca_key_path, error)),
    };
    if !env.disk.exists(&ca_pem_path) {
        return Err(file_error(
            &ca_pem_path,
            "is missing while ca.key exists: restore it from a backup, or remove ca.key to make a new CA (clients must then trust the new ca.pem)",
        ));
    }
    let names = certificate_names(extra);
    let (server_pem, server_key, names_path) = (
        dir.join("server.pem"),
        dir.join("server.key"),
        dir.join("server.names"),
    );
    let wanted = names.join("\n");
    let current = text(&names_path).ok();
    let expires = text(&dir.join("server.expires"))
        .ok()
        .and_then(|t| t.trim().parse::<i64>().ok());
    let fresh = current.as_deref() == Some(wanted.as_str())
        && expires.is_some_and(|at| at - RENEW_DAYS * 86_400 > now.unix_timestamp())
        && env.disk.exists(&server_pem)
        && env.disk.exists(&server_key);
    if !fresh {
        let key = rcgen::KeyPair::generate().map_err(generate)?;
        let mut params = rcgen::CertificateParams::new(names.clone()).map_err(generate)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Maru node");
        params.not_before = now;
        params.not_after = now + days(SERVER_DAYS);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let issuer = rcgen::Issuer::new(ca_params(&ca_key)?, &ca_key);
        let certificate = params.signed_by(&key, &issuer).map_err(generate)?;
        // `server.names` is the commit: gone while the others are rewritten, so a start
        // after a crash in between makes them again rather than pair a new key with an
        // old certificate.
        match env.disk.remove_file(&names_path) {
            Ok(()) => env.disk.sync_dir(dir).map_err(|e| file_error(dir, e))?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(file_error(&names_path, error)),
        }
        write_private(env, &server_key, key.serialize_pem().as_bytes())?;
        write_private(env, &server_pem, certificate.pem().as_bytes())?;
        write_private(
            env,
            &dir.join("server.expires"),
            (now + days(SERVER_DAYS))
                .unix_timestamp()
                .to_string()
                .as_bytes(),
        )?;
        write_private(env, &names_path, wanted.as_bytes())?;
        made.push(format!(
            "a server certificate for {} ({}, signed by the node CA, valid {SERVER_DAYS} days)",
            names.join(", "),
            server_pem.display()
        ));
    }
    let mut chain = certificates(env, &server_pem)?;
    chain.extend(certificates(env, &ca_pem_path)?);
    let pem = env
        .disk
        .read(&server_key)
        .map_err(|e| file_error(&server_key, e))?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| file_error(&server_key, e))?;
    Ok((chain, key, made))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rustls client configuration trusting `ca` (PEM) only: the CA is usable as a root.
    fn client_config(ca_pem: &[u8]) -> Result<rustls::ClientConfig, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for certificate in CertificateDer::pem_slice_iter(ca_pem) {
            let certificate = certificate.map_err(|e| TlsError::Config(e.to_string()))?;
            roots
                .add(certificate)
                .map_err(|e| TlsError::Config(e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_no_client_auth())
    }

    #[test]
    fn the_node_ca_signs_a_server_certificate_a_client_trusting_it_accepts() {
        let dir = tempfile::tempdir().expect("temp dir");
        let env = disk::Env::os();
        let make = |name: &str| {
            node_tls(
                &env,
                Source::NodeCa {
                    dir: dir.path(),
                    names: &[name.to_string()],
                },
            )
        };
        let tls = make("maru.city.example").expect("made");
        assert_eq!(tls.made.len(), 2, "{:?}", tls.made);
        let ca = std::fs::read(dir.path().join("ca.pem")).expect("ca.pem");
        client_config(&ca).expect("a client trusting the CA");
        use std::os::unix::fs::PermissionsExt as _;
        for key in ["ca.key", "server.key"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .expect("key")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        // Again with the same names: nothing new. Another name: a new server certificate
        // from the same CA.
        let again = make("maru.city.example").expect("loaded");
        assert!(again.made.is_empty(), "{:?}", again.made);
        let renamed = make("other.example").expect("reissued");
        assert_eq!(renamed.made.len(), 1, "{:?}", renamed.made);
        assert_eq!(std::fs::read(dir.path().join("ca.pem")).expect("ca"), ca);
    }

    /// Power cuts while the node makes or renews its certificates: every start after one
    /// serves TLS, and once a start has served with a CA, the CA never changes (clients
    /// trust it).
    #[test]
    fn the_node_ca_survives_power_cuts() {
        use disk::sim::{Rng, SimClock, SimDisk};
        let runs = disk::sim::run_schedules(
            "MARU_TLS_POWERCUT",
            100,
            "cargo test -p gateway --lib tls",
            |seed| -> Result<u64, String> {
                let sim = SimDisk::new();
                let env = disk::Env {
                    disk: std::sync::Arc::new(sim.clone()),
                    clock: std::sync::Arc::new(SimClock::new(1_796_000_000_000)),
                };
                let dir = Path::new("/data/tls");
                let mut rng = Rng::new(seed);
                let mut served_ca: Option<Vec<u8>> = None;
                let mut cut = 0;
                let lifetimes = 2 + rng.below(4);
                for lifetime in 0..=lifetimes {
                    let last = lifetime == lifetimes;
                    if !last && rng.percent(60) {
                        sim.crash_after(rng.below(40));
                    }
                    // The names change now and then: a new server certificate.
                    let names = vec![format!("maru-{}.example", rng.below(2))];
                    let result = node_tls(&env, Source::NodeCa { dir, names: &names });
                    if sim.is_off() {
                        cut += 1;
                    } else {
                        result.map_err(|e| format!("lifetime {lifetime}: {e}"))?;
                        let ca = env
                            .disk
                            .read(&dir.join("ca.pem"))
                            .map_err(|e| e.to_string())?;
                        if served_ca.as_ref().is_some_and(|before| *before != ca) {
                            return Err(format!("lifetime {lifetime}: the CA changed"));
                        }
                        served_ca = Some(ca);
                    }
                    sim.power_cut(&mut rng);
                }
                Ok(cut)
            },
        );
        println!(
            "TLS power-cut simulation: {} schedules, {} starts cut off while certificates were made, 0 violations",
            runs.len(),
            runs.iter().sum::<u64>()
        );
    }
}
