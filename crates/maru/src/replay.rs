//! `maru replay`: replay a demand trace, time-compressed, against a live service and report
//! what `maru sim` reports: availability within the SLO, p99 latency, instance-seconds and
//! cold starts.
//!
//! The load is open-loop: requests are sent at the times the trace says, whatever the
//! service's speed, and latency is measured from the time a request was due, so a slow
//! service cannot hide its queueing by slowing the client down.

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::Target;

#[derive(clap::Args)]
pub struct ReplayArgs {
    /// A trace file in one of the formats of shared/traces.
    #[arg(long)]
    trace: PathBuf,
    /// Trace seconds per real second.
    #[arg(long, default_value_t = 60.0)]
    speed: f64,
    /// Where to send the requests (GET).
    #[arg(long)]
    url: String,
    /// The service the URL reaches, as APP/SERVICE, for its instance-seconds and cold starts.
    #[arg(long)]
    service: String,
    /// Scale the trace so its busiest real second sends this many requests.
    #[arg(long, default_value_t = 50.0)]
    peak_rps: f64,
    /// Replay at most this long (real time), from the start of the trace.
    #[arg(long, default_value = "10m")]
    duration: String,
    /// Start this many trace seconds into the trace.
    #[arg(long, default_value_t = 0.0)]
    skip: f64,
    /// A request is served well if it completes within this.
    #[arg(long, default_value = "2s")]
    slo: String,
    /// Client connections at most in flight (requests beyond wait, and their wait counts).
    #[arg(long, default_value_t = 256)]
    connections: usize,
    #[command(flatten)]
    target: Target,
}

#[derive(Serialize)]
struct ReplayReport {
    trace: String,
    service: String,
    seconds: usize,
    speed: f64,
    requests: usize,
    availability: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
    errors: usize,
    instance_seconds: f64,
    cold_starts: u64,
    /// Requests per real second the replay sent, for `maru sim` to be run on the same load.
    rates: Vec<f64>,
}

/// Arrivals per real second: each real second takes `speed` trace seconds.
fn compress(rates: &[f64], step: Duration, speed: f64, skip: f64, seconds: usize) -> Vec<f64> {
    let step = step.as_secs_f64();
    let trace_rate = |t: f64| rates.get((t / step) as usize).copied().unwrap_or(0.0);
    (0..seconds)
        .map(|s| {
            // Integrate the piecewise-constant rate over [start, end) in at most 60 slices.
            let (start, end) = (skip + s as f64 * speed, skip + (s + 1) as f64 * speed);
            let slices = (speed / step).ceil().clamp(1.0, 60.0) as usize;
            let width = (end - start) / slices as f64;
            (0..slices)
                .map(|i| trace_rate(start + (i as f64 + 0.5) * width) * width)
                .sum()
        })
        .collect()
}

pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    if args.speed <= 0.0 || args.peak_rps <= 0.0 || args.connections == 0 {
        bail!("--speed, --peak-rps and --connections must be more than zero");
    }
    let trace = crate::sim::load_trace(&args.trace)?;
    let name = trace.name.clone();
    let duration = crate::sim::duration("duration", &args.duration)?;
    let slo = crate::sim::duration("slo", &args.slo)?;
    let trace_seconds = trace.rates.len() as f64 * trace.step.as_secs_f64() - args.skip;
    let seconds = ((trace_seconds / args.speed).floor() as usize)
        .min(duration.as_secs() as usize)
        .max(1);
    let mut rates = compress(&trace.rates, trace.step, args.speed, args.skip, seconds);
    let peak = rates.iter().copied().fold(0.0, f64::max);
    if peak > 0.0 {
        for rate in &mut rates {
            *rate *= args.peak_rps / peak;
        }
    }
    let before = service_figures(&args.target, &args.service)?;

    // Due times of every request, evenly spaced within each second.
    let mut due: Vec<Duration> = Vec::new();
    let mut carry = 0.0;
    for (second, rate) in rates.iter().enumerate() {
        let wanted = rate + carry;
        let count = wanted.floor() as usize;
        carry = wanted - count as f64;
        for i in 0..count {
            due.push(Duration::from_secs_f64(
                second as f64 + (i as f64 + 0.5) / count as f64,
            ));
        }
    }
    let bar = if args.target.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(due.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("  replay {bar:40} {pos}/{len} requests {elapsed}/{msg}")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    bar.set_message(format!("{seconds}s"));
    let results: Mutex<Vec<(u16, Duration)>> = Mutex::new(Vec::with_capacity(due.len()));
    let (send, receive) = std::sync::mpsc::sync_channel::<Instant>(due.len().max(1));
    let receive = Mutex::new(receive);
    let done = AtomicBool::new(false);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..args.connections {
            scope.spawn(|| {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .http_status_as_error(false)
                    .timeout_global(Some(Duration::from_secs(30)))
                    .build()
                    .into();
                loop {
                    let next = receive
                        .lock()
                        .expect("receiver lock")
                        .recv_timeout(Duration::from_millis(100));
                    let due_at = match next {
                        Ok(due_at) => due_at,
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout)
                            if !done.load(Ordering::Relaxed) =>
                        {
                            continue;
                        }
                        Err(_) => break,
                    };
                    let status = match agent.get(&args.url).call() {
                        Ok(mut response) => {
                            _ = response.body_mut().read_to_string();
                            response.status().as_u16()
                        }
                        Err(_) => 0,
                    };
                    results
                        .lock()
                        .expect("results lock")
                        .push((status, due_at.elapsed()));
                    bar.inc(1);
                }
            });
        }
        for offset in &due {
            let due_at = start + *offset;
            if let Some(wait) = due_at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if send.send(due_at).is_err() {
                break;
            }
        }
        done.store(true, Ordering::Relaxed);
        // Disconnects the channel: idle workers stop at once instead of timing out in turn.
        drop(send);
    });
    bar.finish_and_clear();
    let after = service_figures(&args.target, &args.service)?;

    let results = results.into_inner().expect("results lock");
    let mut latencies: Vec<Duration> = results.iter().map(|(_, latency)| *latency).collect();
    latencies.sort();
    let quantile = |q: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * q).round() as usize)
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    let good = results
        .iter()
        .filter(|(status, latency)| (200..400).contains(status) && *latency <= slo)
        .count();
    let report = ReplayReport {
        trace: name,
        service: args.service.clone(),
        seconds,
        speed: args.speed,
        requests: results.len(),
        availability: if results.is_empty() {
            1.0
        } else {
            good as f64 / results.len() as f64
        },
        latency_p50_ms: quantile(0.5),
        latency_p99_ms: quantile(0.99),
        errors: results
            .iter()
            .filter(|(status, _)| *status == 0 || *status >= 500)
            .count(),
        instance_seconds: after.0 - before.0,
        cold_starts: after.1.saturating_sub(before.1),
        rates,
    };
    if args.target.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "replayed {} s of {} at {}× ({} trace seconds) against {}: {} requests",
        report.seconds,
        report.trace,
        report.speed,
        report.seconds as f64 * report.speed,
        report.service,
        report.requests
    );
    println!(
        "  availability {:.3} % within {:?}   p50 {:.1} ms   p99 {:.1} ms   errors {}",
        report.availability * 100.0,
        slo,
        report.latency_p50_ms,
        report.latency_p99_ms,
        report.errors
    );
    println!(
        "  instance-seconds {:.1}   cold starts {}",
        report.instance_seconds, report.cold_starts
    );
    Ok(())
}

/// (instance-seconds, cold starts) of a running service.
fn service_figures(target: &Target, service: &str) -> anyhow::Result<(f64, u64)> {
    let (app, name) = service
        .split_once('/')
        .context("--service must be APP/SERVICE")?;
    let services = crate::client::services(target)?;
    let status = services
        .iter()
        .find(|s| s.app == app && s.service == name)
        .with_context(|| format!("no running service {service}; `maru ps` lists them"))?;
    Ok((status.instance_seconds, status.cold_starts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_integrates_the_trace() {
        // Per-second trace 1, 2, 3, 4: at 2× each real second gets two trace seconds.
        assert_eq!(
            compress(&[1.0, 2.0, 3.0, 4.0], Duration::from_secs(1), 2.0, 0.0, 2),
            vec![3.0, 7.0]
        );
        // Per-minute trace at 60 req/s for one minute, 30×: each real second is 30 s of it.
        assert_eq!(
            compress(&[60.0], Duration::from_secs(60), 30.0, 0.0, 2),
            vec![1800.0, 1800.0]
        );
        // Skipping into the trace.
        assert_eq!(
            compress(&[1.0, 2.0, 3.0, 4.0], Duration::from_secs(1), 1.0, 2.0, 2),
            vec![3.0, 4.0]
        );
    }
}
