//! `maru sim`: run scaling policies against a demand trace in the deterministic simulator,
//! the same policy code the platform runs.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use autopilot::ScalingBounds;
use autopilot::evaluate::{self, Knob, PolicyKind};
use autopilot::sim::{PowerModel, SimConfig, SimResult};
use autopilot::traces::{self, Format};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

#[derive(clap::Args)]
pub struct SimArgs {
    /// A trace file in one of the formats of shared/traces (chosen by its name).
    #[arg(long)]
    trace: PathBuf,
    /// Policies to run, comma-separated, or `all`.
    #[arg(long, default_value = "all")]
    policy: String,
    /// Scale the trace so its peak needs this many instances at full utilisation.
    #[arg(long, default_value_t = 100)]
    peak_instances: u32,
    /// Mean service time of one request.
    #[arg(long, default_value = "100ms")]
    service_time: String,
    /// Requests one instance serves at once.
    #[arg(long, default_value_t = 1)]
    concurrency: u32,
    /// Time from asking for an instance to it being ready.
    #[arg(long, default_value = "30s")]
    startup: String,
    /// A request is served well if it completes within this.
    #[arg(long, default_value = "2s")]
    slo: String,
    /// A request waiting longer is dropped.
    #[arg(long, default_value = "10s")]
    timeout: String,
    /// Age of the metrics the policies see.
    #[arg(long, default_value = "0s")]
    metric_delay: String,
    /// Simulate only the first this many days of the trace.
    #[arg(long)]
    limit_days: Option<f64>,
    /// Tune each policy's knob on the first part of the trace, report on the rest.
    #[arg(long)]
    tune: bool,
    /// With --tune: the fraction of the trace used for tuning.
    #[arg(long, default_value_t = 0.7)]
    train: f64,
    /// With --tune: the availability the tuned setting must hold on the training part.
    #[arg(long, default_value_t = 0.999)]
    availability: f64,
    /// Write an SVG plot of demand, forecast and capacity over time.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Steps not measured at the start (every policy starts idle). Default: the shorter of
    /// one hour and a tenth of the trace; 0 to compare with a replay that started idle too.
    #[arg(long)]
    warm_up: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Serialize)]
struct Row {
    trace: String,
    policy: String,
    knob: String,
    /// What the knob sets.
    knob_meaning: String,
    tuned_reached_target: Option<bool>,
    availability: f64,
    latency_p99_ms: f64,
    instance_seconds: f64,
    instance_seconds_vs_hpa: Option<f64>,
    instance_seconds_vs_oracle: Option<f64>,
    cold_starts: u64,
    scale_events: u64,
    energy_kwh: f64,
}

#[derive(Serialize)]
struct Report {
    trace: String,
    steps: usize,
    step_seconds: f64,
    scale_factor: f64,
    startup_seconds: f64,
    service_time_ms: f64,
    per_instance_rate: f64,
    measured_from_step: usize,
    rows: Vec<Row>,
}

pub(crate) fn duration(flag: &str, text: &str) -> anyhow::Result<Duration> {
    control::manifest::parse_duration(text).map_err(|e| anyhow::anyhow!("--{flag}: {e}"))
}

/// Read and parse a trace file; its format is told by its name.
pub(crate) fn load_trace(path: &std::path::Path) -> anyhow::Result<traces::Trace> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let format = Format::from_name(&name)
        .with_context(|| format!("cannot tell the format of {name}; name it like the files in shared/traces (*.txt, *.csv, *hourly*, azure*)"))?;
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    Ok(traces::parse(&name, format, &text)?)
}

pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let mut trace = load_trace(&args.trace)?;
    if let Some(days) = args.limit_days {
        let steps = (days * 86_400.0 / trace.step.as_secs_f64()) as usize;
        trace.rates.truncate(steps.max(1));
    }
    if args.concurrency == 0 || args.peak_instances == 0 {
        bail!("--concurrency and --peak-instances must be at least 1");
    }
    let config = SimConfig {
        step: trace.step,
        startup: duration("startup", &args.startup)?,
        service_time: duration("service-time", &args.service_time)?,
        slo: duration("slo", &args.slo)?,
        timeout: duration("timeout", &args.timeout)?,
        metric_delay: duration("metric-delay", &args.metric_delay)?,
        bounds: ScalingBounds {
            instances_min: 0,
            // Headroom above the peak so that cautious policies are not capped.
            instances_max: args.peak_instances.saturating_mul(4),
            concurrency: args.concurrency,
            idle_timeout: Duration::from_secs(30),
        },
        power: PowerModel::default(),
        series_points: 1500,
        measure_from: 0,
    };
    if config.service_time.is_zero() {
        bail!("--service-time must be more than zero");
    }
    let scale_factor =
        trace.scale_peak_to(f64::from(args.peak_instances) * config.per_instance_rate());
    let kinds: Vec<PolicyKind> = if args.policy == "all" {
        PolicyKind::ALL.to_vec()
    } else {
        args.policy
            .split(',')
            .map(|p| {
                PolicyKind::parse(p.trim()).with_context(|| {
                    format!(
                        "unknown policy `{p}`; choose from {}",
                        PolicyKind::ALL.map(PolicyKind::name).join(", ")
                    )
                })
            })
            .collect::<anyhow::Result<_>>()?
    };
    let rates: Arc<[f64]> = trace.rates.clone().into();
    let measure_from = if args.tune {
        (rates.len() as f64 * args.train) as usize
    } else {
        args.warm_up
            .unwrap_or_else(|| evaluate::warm_up_steps(rates.len(), trace.step))
    };

    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(rates.len() as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{msg:>34} {bar:40} {percent:>3}% {elapsed}")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let mut results: Vec<(PolicyKind, Knob, Option<bool>, SimResult)> = Vec::new();
    for kind in kinds {
        let (knob, reached) = if args.tune && kind != PolicyKind::Reactive {
            bar.set_message(format!("tuning {}", kind.name()));
            let tuned = evaluate::tune(
                kind,
                &rates,
                measure_from,
                &config,
                args.availability,
                &mut |done, total| {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                },
            );
            (tuned.knob, Some(tuned.reached))
        } else {
            (evaluate::default_knob(kind, &config), None)
        };
        bar.set_message(format!("running {}", kind.name()));
        let result = evaluate::run(
            kind,
            knob,
            &rates,
            &config,
            measure_from,
            &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        );
        results.push((kind, knob, reached, result));
    }
    bar.finish_and_clear();

    let cost_of = |kind: PolicyKind| {
        results
            .iter()
            .find(|(k, ..)| *k == kind)
            .map(|(.., r)| r.instance_seconds)
    };
    let (hpa, oracle) = (cost_of(PolicyKind::Hpa), cost_of(PolicyKind::Oracle));
    let rows: Vec<Row> = results
        .iter()
        .map(|(kind, knob, reached, result)| Row {
            trace: trace.name.clone(),
            policy: kind.name().into(),
            knob_meaning: kind.knob_name().into(),
            knob: match kind {
                PolicyKind::Reactive => "-".into(),
                PolicyKind::Static => format!("{}", knob.value),
                PolicyKind::Oracle => format!("{:.3}, {}s", knob.value, knob.window.as_secs()),
                _ => format!("{:.3}", knob.value),
            },
            tuned_reached_target: *reached,
            availability: result.availability,
            latency_p99_ms: result.latency_p99.as_secs_f64() * 1000.0,
            instance_seconds: result.instance_seconds,
            instance_seconds_vs_hpa: hpa
                .filter(|h| *h > 0.0)
                .map(|h| result.instance_seconds / h),
            instance_seconds_vs_oracle: oracle
                .filter(|o| *o > 0.0)
                .map(|o| result.instance_seconds / o),
            cold_starts: result.cold_starts,
            scale_events: result.scale_events,
            energy_kwh: result.energy_kwh,
        })
        .collect();
    if let Some(path) = &args.plot {
        std::fs::write(path, plot(&trace.name, &results, config.step))
            .with_context(|| format!("write {}", path.display()))?;
    }
    let report = Report {
        trace: trace.name.clone(),
        steps: rates.len(),
        step_seconds: config.step.as_secs_f64(),
        scale_factor,
        startup_seconds: config.startup.as_secs_f64(),
        service_time_ms: config.service_time.as_secs_f64() * 1000.0,
        per_instance_rate: config.per_instance_rate(),
        measured_from_step: measure_from,
        rows,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: {} steps of {} s, peak scaled to {} instances ({:.1} req/s each; factor {:.4}), startup {} s{}",
        report.trace,
        report.steps,
        report.step_seconds,
        args.peak_instances,
        report.per_instance_rate,
        scale_factor,
        report.startup_seconds,
        if args.tune {
            format!(
                ", tuned on the first {:.0} %, measured on the rest",
                args.train * 100.0
            )
        } else {
            format!(", measured after a warm-up of {measure_from} steps")
        }
    );
    println!(
        "{:<15} {:>14} {:>10} {:>9} {:>14} {:>8} {:>8} {:>6} {:>8} {:>9}",
        "POLICY",
        "KNOB",
        "AVAIL %",
        "P99 ms",
        "INST-SECONDS",
        "vs HPA",
        "vs ORACLE",
        "COLD",
        "EVENTS",
        "kWh"
    );
    for row in &report.rows {
        let ratio = |r: Option<f64>| r.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into());
        let missed = if row.tuned_reached_target == Some(false) {
            "*"
        } else {
            ""
        };
        println!(
            "{:<15} {:>14} {:>10.3} {:>9.0} {:>14.0} {:>8} {:>8} {:>6} {:>8} {:>9.2}",
            format!("{}{missed}", row.policy),
            row.knob,
            row.availability * 100.0,
            row.latency_p99_ms,
            row.instance_seconds,
            ratio(row.instance_seconds_vs_hpa),
            ratio(row.instance_seconds_vs_oracle),
            row.cold_starts,
            row.scale_events,
            row.energy_kwh
        );
    }
    if report
        .rows
        .iter()
        .any(|r| r.tuned_reached_target == Some(false))
    {
        println!(
            "* no setting reached the availability target on the training part; the most generous one is shown"
        );
    }
    Ok(())
}

/// A plain SVG line chart: demand (in instances at full utilisation), each policy's
/// provisioned instances, and, dashed, the demand each forecasting policy forecast for that
/// time one start-up time and one step before.
fn plot(
    name: &str,
    results: &[(PolicyKind, Knob, Option<bool>, SimResult)],
    step: Duration,
) -> String {
    let (width, height, margin) = (1200.0, 500.0, 50.0);
    let Some((.., first)) = results.first() else {
        return String::new();
    };
    let points = first.series.len().max(2);
    let top = results
        .iter()
        .flat_map(|(.., r)| {
            r.series.iter().map(|p| {
                p.provisioned
                    .max(p.demand_instances)
                    .max(p.forecast_instances.unwrap_or(0.0))
            })
        })
        .fold(1.0, f64::max);
    let x = |i: usize| margin + (width - 2.0 * margin) * i as f64 / (points - 1) as f64;
    let y = |v: f64| height - margin - (height - 2.0 * margin) * v / top;
    let line = |values: Vec<f64>| {
        values
            .iter()
            .enumerate()
            .map(|(i, v)| format!("{:.1},{:.1}", x(i), y(*v)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let colours = [
        "#888", "#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#000",
    ];
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"{margin}\" y=\"20\">{name}: demand (grey, instances needed at 100 %), provisioned instances and forecast demand (dashed); {} s per step, {} points</text>\n",
        step.as_secs(),
        points
    );
    svg.push_str(&format!(
        "<polyline fill=\"#ddd\" stroke=\"none\" points=\"{:.1},{:.1} {} {:.1},{:.1}\"/>\n",
        x(0),
        y(0.0),
        line(first.series.iter().map(|p| p.demand_instances).collect()),
        x(points - 1),
        y(0.0)
    ));
    for (index, (kind, ..)) in results.iter().enumerate() {
        let colour = colours[index % colours.len()];
        let series = &results[index].3.series;
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1\" points=\"{}\"/>\n",
            line(series.iter().map(|p| p.provisioned).collect())
        ));
        // The forecast, in runs of points that have one.
        let mut run: Vec<String> = Vec::new();
        for (i, point) in series.iter().enumerate() {
            if let Some(value) = point.forecast_instances {
                run.push(format!("{:.1},{:.1}", x(i), y(value)));
            }
            if (point.forecast_instances.is_none() || i + 1 == series.len()) && !run.is_empty() {
                svg.push_str(&format!(
                    "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1\" stroke-dasharray=\"4 3\" points=\"{}\"/>\n",
                    run.join(" ")
                ));
                run.clear();
            }
        }
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{}\" fill=\"{colour}\">{}</text>\n",
            width - 180.0,
            40.0 + 16.0 * index as f64,
            kind.name()
        ));
    }
    svg.push_str(&format!(
        "<text x=\"5\" y=\"{:.0}\">{top:.0}</text><text x=\"5\" y=\"{:.0}\">0</text>\n</svg>\n",
        y(top) + 4.0,
        y(0.0)
    ));
    svg
}
