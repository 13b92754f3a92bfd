//! `maru`: the one binary. `maru up` runs a node; every other command is a client of a
//! node's control API.

mod audit_cli;
mod client;
mod identity_cli;
mod policy_cli;
mod replay;
mod sim;
mod store_cli;
mod up;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "maru",
    version,
    about = "A self-driving cloud platform in one binary",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How a client command finds its node.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// Control API address, e.g. https://maru.city.example:8090. Default: read from
    /// DATA/node.json, else https://127.0.0.1:8090.
    #[arg(long, env = "MARU_CONTROL", global = true)]
    control: Option<String>,
    /// The CA certificate (PEM) to trust for the control API. Default: the node's CA
    /// (DATA/tls/ca.pem) if there is one, else the public web's roots.
    #[arg(long, env = "MARU_CA", global = true)]
    ca: Option<PathBuf>,
    /// Bearer token for the control API. Default: the `token` file in the data directory.
    #[arg(long, env = "MARU_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// The node's data directory, where the CLI looks for `token` and `node.json`.
    #[arg(long, env = "MARU_DATA", global = true, default_value = "./maru-data")]
    data: PathBuf,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run a node with everything embedded: gateway, runtime, control API.
    Up(up::UpArgs),
    /// Validate a manifest, upload its components and deploy it as a new revision.
    Deploy {
        /// Path to the app manifest (maru.toml).
        manifest: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// List deployed apps and their revisions.
    Apps {
        #[command(flatten)]
        target: Target,
    },
    /// Show each running service: revision, instances, load, latency, cold starts.
    Ps {
        #[command(flatten)]
        target: Target,
    },
    /// List the cluster's nodes (or this node, without a cluster): labels, capacity,
    /// instances, health.
    Nodes {
        #[command(flatten)]
        target: Target,
    },
    /// Drain a node of the cluster: the scheduler moves its instances to other nodes (new
    /// ones start there while it finishes what it has) and places nothing more on it, until
    /// `maru drain NODE --undo`. Waits until the node runs no instances of the cluster's
    /// apps, showing how many are left.
    Drain {
        /// The node's name, as `maru nodes` lists it.
        node: String,
        /// Stop draining it: the scheduler may place instances on it again.
        #[arg(long)]
        undo: bool,
        /// Return once the drain is recorded, without waiting for the instances to move.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        target: Target,
    },
    /// List anomalies found in services' traffic, latency and error rate.
    Anomalies {
        #[command(flatten)]
        target: Target,
    },
    /// Print a service's guest stdout/stderr and platform events.
    Logs {
        /// APP/SERVICE, or SERVICE if its name is unique.
        service: String,
        /// Keep printing new lines until interrupted.
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Remove an app and all its revisions.
    Rm {
        app: String,
        #[command(flatten)]
        target: Target,
    },
    /// Replay a demand trace, time-compressed, against a live service.
    Replay(replay::ReplayArgs),
    /// Run scaling policies against a demand trace in the deterministic simulator.
    Sim(sim::SimArgs),
    /// Look at event topics: `maru events stats`, `maru events tail TOPIC`.
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Make the revision that served before the current one serve again.
    Rollback {
        app: String,
        #[command(flatten)]
        target: Target,
    },
    /// The object store: `maru store status|scrub|keys`.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
    /// The first operator: `maru admin init --name NAME` (with the node's bootstrap token,
    /// which then stops working).
    Admin {
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Log in with a password and a TOTP code; the CLI keeps the token (12 h).
    Login {
        #[arg(long)]
        name: String,
        /// The current TOTP code (asked for if not given).
        #[arg(long)]
        code: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        /// A shorter lifetime for the token, in seconds.
        #[arg(long)]
        ttl_seconds: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// Revoke the CLI's login token and forget it.
    Logout {
        #[command(flatten)]
        target: Target,
    },
    /// Who the CLI's token belongs to, its roles and expiry.
    Whoami {
        #[command(flatten)]
        target: Target,
    },
    /// Machine tokens (CI deploys, Prometheus): `create`, `list`, `revoke`.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Operators: `maru operators create --name NAME --role ROLE`.
    Operators {
        #[command(subcommand)]
        command: OperatorsCommand,
    },
    /// The node's Cedar policies: `maru policy show|set FILE|test`.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// The audit log: `maru audit tail|search|checkpoint|verify`.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Internal: how a node starts a process service's instance: confine this process as
    /// the policy says (runtime::sandbox), then execute the program in its place.
    #[command(name = "sandbox-exec", hide = true)]
    SandboxExec {
        #[arg(long)]
        policy: String,
        /// The program and its arguments.
        #[arg(last = true, required = true)]
        command: Vec<std::ffi::OsString>,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print the active policies.
    Show {
        #[command(flatten)]
        target: Target,
    },
    /// Replace the policies with a file's, if it validates strictly against the schema.
    Set {
        file: PathBuf,
        #[command(flatten)]
        target: Target,
    },
    /// A dry run: how the policies (or a file's) decide a request, and which policies decide.
    Test {
        /// `operator:NAME`, `machine:NAME` or `bootstrap`.
        #[arg(long)]
        subject: String,
        #[arg(long = "role")]
        roles: Vec<String>,
        /// e.g. `apps.deploy` (docs/policy.md lists them).
        #[arg(long)]
        action: String,
        /// e.g. `app/traffic`, `store`, `node`.
        #[arg(long, default_value = "node")]
        resource: String,
        /// Decide under this file's policies instead of the active ones.
        #[arg(long)]
        policies: Option<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create the first operator (an admin) and enrol its TOTP second factor.
    Init {
        #[arg(long)]
        name: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum TokensCommand {
    /// A token for a machine, with some of your roles, expiring (the secret is shown once).
    Create {
        #[arg(long)]
        name: String,
        /// A role it has (repeat): admin, deployer, viewer, auditor, metrics.
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        /// How long it lives: 45s, 90m, 12h, 30d (at most 366d, never past your own).
        #[arg(long, default_value = "30d")]
        ttl: String,
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        target: Target,
    },
    /// Every token (never their secrets), with its state.
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Revoke a token by its id (`tok_…`): refused from the next request on.
    Revoke {
        id: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum OperatorsCommand {
    /// Another operator, with roles and a TOTP second factor.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// The newest entries.
    Tail {
        #[arg(long, short = 'n', default_value_t = 20)]
        count: usize,
        #[command(flatten)]
        target: Target,
    },
    /// The newest entries that match the filters.
    Search {
        #[command(flatten)]
        filters: audit_cli::Filters,
        /// At most this many (the newest).
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Print the newest entry signed by the node's key, as JSON to keep elsewhere.
    Checkpoint {
        #[command(flatten)]
        target: Target,
    },
    /// Check the chain of every entry in the data directory's log, and the checkpoints
    /// (the node's own and any given); exits 1 at the first entry edited, deleted,
    /// reordered or cut off.
    Verify {
        /// A checkpoint saved from `maru audit checkpoint` (repeat for more).
        #[arg(long = "checkpoint")]
        checkpoints: Vec<PathBuf>,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Volumes and their health, degraded objects, scrub and heal progress.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Verify every block of every object now, healing what is damaged, and show the status.
    Scrub {
        #[command(flatten)]
        target: Target,
    },
    /// Make a new master key wrap every object's data key (no data is rewritten) and
    /// forget the old one.
    RotateKey {
        #[command(flatten)]
        target: Target,
    },
    /// S3 access keys: `create`, `list`, `revoke`.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// A new access key for the named buckets (the secret is shown once).
    Create {
        /// A bucket the key may use (repeat for more; `*` for every bucket).
        #[arg(long = "bucket", required = true)]
        buckets: Vec<String>,
        /// What the key is for.
        #[arg(long, default_value = "")]
        description: String,
        #[command(flatten)]
        target: Target,
    },
    /// The access keys and their buckets (never their secrets).
    List {
        #[command(flatten)]
        target: Target,
    },
    /// Revoke a key: it authenticates nothing from then on.
    Revoke {
        access_key: String,
        #[command(flatten)]
        target: Target,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Each topic's size, append rate, and each consumer group's committed offset and lag.
    Stats {
        #[command(flatten)]
        target: Target,
    },
    /// Print a topic's events: the last few, or from an offset; --follow keeps printing.
    Tail {
        topic: String,
        /// Start at this offset [default: the last --count events].
        #[arg(long)]
        from: Option<u64>,
        /// How many recent events to print first.
        #[arg(long, short = 'n', default_value_t = 10)]
        count: usize,
        #[arg(long, short)]
        follow: bool,
        #[command(flatten)]
        target: Target,
    },
}

/// The sandbox launcher: returns only if the program could not be started.
fn sandbox_exec(policy: &str, command: &[std::ffi::OsString]) -> anyhow::Result<()> {
    let policy: runtime::sandbox::Policy = serde_json::from_str(policy)
        .map_err(|e| anyhow::anyhow!("the sandbox policy does not parse: {e}"))?;
    let (program, args) = command
        .split_first()
        .ok_or_else(|| anyhow::anyhow!("no program to run"))?;
    Err(anyhow::anyhow!(
        "maru sandbox: {}",
        runtime::sandbox::exec(&policy, program, args)
    ))
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::SandboxExec { policy, command } => match sandbox_exec(&policy, &command) {
            Ok(()) => Ok(()),
            Err(error) => {
                // In the service's log, as the program's own stderr would be.
                eprintln!("{error:#}");
                return std::process::ExitCode::from(126);
            }
        },
        Command::Up(args) => up::run(args),
        Command::Deploy { manifest, target } => client::deploy(&target, &manifest),
        Command::Apps { target } => client::apps(&target),
        Command::Ps { target } => client::ps(&target),
        Command::Nodes { target } => client::nodes(&target),
        Command::Drain {
            node,
            undo,
            no_wait,
            target,
        } => client::drain(&target, &node, undo, no_wait),
        Command::Logs {
            service,
            follow,
            target,
        } => client::logs(&target, &service, follow),
        Command::Rm { app, target } => client::remove(&target, &app),
        Command::Rollback { app, target } => client::rollback(&target, &app),
        Command::Sim(args) => sim::run(args),
        Command::Replay(args) => replay::run(args),
        Command::Anomalies { target } => client::anomalies(&target),
        Command::Admin {
            command:
                AdminCommand::Init {
                    name,
                    password_stdin,
                    target,
                },
        } => identity_cli::admin_init(&target, &name, password_stdin),
        Command::Login {
            name,
            code,
            password_stdin,
            ttl_seconds,
            target,
        } => identity_cli::login(&target, &name, code, password_stdin, ttl_seconds),
        Command::Logout { target } => identity_cli::logout(&target),
        Command::Whoami { target } => identity_cli::whoami(&target),
        Command::Tokens { command } => match command {
            TokensCommand::Create {
                name,
                roles,
                ttl,
                description,
                target,
            } => identity_cli::create_token(&target, &name, roles, &ttl, description),
            TokensCommand::List { target } => identity_cli::list_tokens(&target),
            TokensCommand::Revoke { id, target } => identity_cli::revoke_token(&target, &id),
        },
        Command::Operators {
            command:
                OperatorsCommand::Create {
                    name,
                    roles,
                    password_stdin,
                    target,
                },
        } => identity_cli::create_operator(&target, &name, roles, password_stdin),
        Command::Policy { command } => match command {
            PolicyCommand::Show { target } => policy_cli::show(&target),
            PolicyCommand::Set { file, target } => policy_cli::set(&target, &file),
            PolicyCommand::Test {
                subject,
                roles,
                action,
                resource,
                policies,
                target,
            } => policy_cli::test(
                &target,
                &subject,
                roles,
                &action,
                &resource,
                policies.as_deref(),
            ),
        },
        Command::Audit { command } => match command {
            AuditCommand::Tail { count, target } => {
                audit_cli::search(&target, &audit_cli::Filters::default(), count)
            }
            AuditCommand::Search {
                filters,
                limit,
                target,
            } => audit_cli::search(&target, &filters, limit),
            AuditCommand::Checkpoint { target } => audit_cli::checkpoint(&target),
            AuditCommand::Verify {
                checkpoints,
                target,
            } => audit_cli::verify(&target, &checkpoints),
        },
        Command::Store { command } => match command {
            StoreCommand::Status { target } => store_cli::status(&target),
            StoreCommand::Scrub { target } => store_cli::scrub(&target),
            StoreCommand::RotateKey { target } => store_cli::rotate_key(&target),
            StoreCommand::Keys { command } => match command {
                KeysCommand::Create {
                    buckets,
                    description,
                    target,
                } => store_cli::create_key(&target, buckets, description),
                KeysCommand::List { target } => store_cli::list_keys(&target),
                KeysCommand::Revoke { access_key, target } => {
                    store_cli::revoke_key(&target, &access_key)
                }
            },
        },
        Command::Events {
            command: EventsCommand::Stats { target },
        } => client::events_stats(&target),
        Command::Events {
            command:
                EventsCommand::Tail {
                    topic,
                    from,
                    count,
                    follow,
                    target,
                },
        } => client::events_tail(&target, &topic, from, count, follow),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
