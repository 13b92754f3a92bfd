//! Fair comparison of policies: each policy's one knob is tuned on the first part of a
//! trace to the cheapest setting that holds the availability target there, then reported on
//! the held-out rest. Policies run over the whole trace (so forecasting policies keep what
//! they learned), but only the held-out steps are measured.

use std::sync::Arc;
use std::time::Duration;

use crate::policies::{AwsPredictive, Caution, Hpa, Kpa, Oracle, Predictive, Static};
use crate::sim::{SimConfig, SimResult, simulate};
use crate::{Policy, Reactive};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyKind {
    Static,
    Reactive,
    Hpa,
    Kpa,
    AwsPredictive,
    Predictive,
    Oracle,
}

impl PolicyKind {
    pub const ALL: [PolicyKind; 7] = [
        PolicyKind::Static,
        PolicyKind::Reactive,
        PolicyKind::Hpa,
        PolicyKind::Kpa,
        PolicyKind::AwsPredictive,
        PolicyKind::Predictive,
        PolicyKind::Oracle,
    ];

    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::Static => "static",
            PolicyKind::Reactive => "reactive",
            PolicyKind::Hpa => "hpa",
            PolicyKind::Kpa => "kpa",
            PolicyKind::AwsPredictive => "aws-predictive",
            PolicyKind::Predictive => "predictive",
            PolicyKind::Oracle => "oracle",
        }
    }

    pub fn parse(text: &str) -> Option<PolicyKind> {
        Self::ALL.into_iter().find(|kind| kind.name() == text)
    }

    /// What the knob means, for reports.
    pub fn knob_name(self) -> &'static str {
        match self {
            PolicyKind::Static => "instances",
            PolicyKind::Reactive => "-",
            PolicyKind::Hpa | PolicyKind::Kpa | PolicyKind::AwsPredictive => "target utilisation",
            PolicyKind::Predictive => "target utilisation (the error quantile moves with it)",
            PolicyKind::Oracle => "utilisation, window s",
        }
    }
}

/// A knob setting: one value, plus the oracle's smoothing window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Knob {
    pub value: f64,
    pub window: Duration,
}

/// Steps at the start of a trace that are simulated but not measured: every policy starts
/// from its own idle state, which no running service is in. The shorter of one hour and a
/// tenth of the trace.
pub fn warm_up_steps(len: usize, step: Duration) -> usize {
    let hour = (3600.0 / step.as_secs_f64().max(1e-9)) as usize;
    hour.min(len / 10)
}

/// The predictive policy's tuning knob, in the same "higher is cheaper" sense as the
/// others' utilisation targets and over the same range: the knob is the target utilisation
/// (0.05 to 1.0, as for hpa, kpa, aws-predictive and the oracle), and the forecast-error
/// quantile provisioned for moves with it, from the 99.9th percentile (knob 0.05) to the
/// median (knob 0.95 and above).
pub fn predictive_caution(knob: f64) -> Caution {
    let boldness = ((knob - 0.05) / 0.9).clamp(0.0, 1.0);
    Caution {
        quantile: 0.999 - 0.499 * boldness,
        utilisation: knob.clamp(*KNOB_RANGE.start(), *KNOB_RANGE.end()),
    }
}

/// The range every utilisation-like knob is tuned over (and the manifest's `target` and
/// numeric `caution` accept): from cautious to running instances full.
pub const KNOB_RANGE: std::ops::RangeInclusive<f64> = 0.05..=1.0;

/// Build a policy. `rates` is the whole trace (only the oracle looks at it).
pub fn build(
    kind: PolicyKind,
    knob: Knob,
    rates: &Arc<[f64]>,
    config: &SimConfig,
) -> Box<dyn Policy> {
    match kind {
        PolicyKind::Static => Box::new(Static {
            instances: knob.value.round().max(0.0) as u32,
        }),
        PolicyKind::Reactive => Box::new(Reactive),
        PolicyKind::Hpa => Box::new(Hpa::new(knob.value)),
        PolicyKind::Kpa => Box::new(Kpa::new(knob.value)),
        PolicyKind::AwsPredictive => Box::new(AwsPredictive::new(knob.value)),
        PolicyKind::Predictive => Box::new(
            Predictive::new(predictive_caution(knob.value), config.startup)
                .with_slo(Some(config.slo)),
        ),
        PolicyKind::Oracle => Box::new(Oracle::new(
            rates.clone(),
            config.step,
            config.startup + config.step,
            knob.window,
            config.per_instance_rate(),
            knob.value,
        )),
    }
}

/// The default knob of each policy: its documented default, or Maru's normal caution.
pub fn default_knob(kind: PolicyKind, config: &SimConfig) -> Knob {
    let window = Duration::from_secs(1).max(config.step);
    match kind {
        PolicyKind::Static => Knob {
            value: f64::from(config.bounds.instances_max),
            window,
        },
        PolicyKind::Hpa | PolicyKind::AwsPredictive => Knob { value: 0.5, window },
        PolicyKind::Kpa => Knob { value: 0.7, window },
        PolicyKind::Predictive => Knob { value: 0.5, window },
        PolicyKind::Reactive | PolicyKind::Oracle => Knob { value: 1.0, window },
    }
}

/// Simulate `kind` over all of `rates`, measuring from step `measure_from`.
pub fn run(
    kind: PolicyKind,
    knob: Knob,
    rates: &Arc<[f64]>,
    config: &SimConfig,
    measure_from: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> SimResult {
    let mut policy = build(kind, knob, rates, config);
    let config = SimConfig {
        measure_from,
        ..*config
    };
    simulate(rates, &config, policy.as_mut(), progress)
}

#[derive(Debug, Clone)]
pub struct Tuned {
    pub knob: Knob,
    /// On the training part.
    pub train: SimResult,
    /// Whether any setting reached the availability target on the training part.
    pub reached: bool,
}

/// Find the cheapest knob setting that holds `availability` on `rates[..train_end]`.
///
/// The search assumes availability falls as the knob makes the policy cheaper (higher
/// utilisation, fewer static instances), and bisects; if even the most generous setting
/// misses the target, that setting is returned with `reached: false`.
pub fn tune(
    kind: PolicyKind,
    rates: &Arc<[f64]>,
    train_end: usize,
    config: &SimConfig,
    availability: f64,
    progress: &mut dyn FnMut(usize, usize),
) -> Tuned {
    let train: Arc<[f64]> = rates[..train_end].into();
    // The oracle reads the future from the same array it is simulated over.
    let warm_up = warm_up_steps(train.len(), config.step);
    let attempt = |knob: Knob, progress: &mut dyn FnMut(usize, usize)| {
        run(kind, knob, &train, config, warm_up, progress)
    };
    let window = Duration::from_secs(1).max(config.step);
    match kind {
        PolicyKind::Reactive => {
            let knob = Knob { value: 1.0, window };
            let result = attempt(knob, progress);
            let reached = result.availability >= availability;
            Tuned {
                knob,
                train: result,
                reached,
            }
        }
        PolicyKind::Static => {
            let (mut low, mut high) = (0u32, config.bounds.instances_max.max(1));
            let mut best = None;
            while low <= high {
                let middle = low + (high - low) / 2;
                let knob = Knob {
                    value: f64::from(middle),
                    window,
                };
                let result = attempt(knob, progress);
                if result.availability >= availability {
                    best = Some((knob, result));
                    if middle == 0 {
                        break;
                    }
                    high = middle - 1;
                } else {
                    low = middle + 1;
                }
            }
            finish(best, || {
                let knob = Knob {
                    value: f64::from(config.bounds.instances_max),
                    window,
                };
                (knob, attempt(knob, &mut |_, _| {}))
            })
        }
        PolicyKind::Oracle => {
            let mut best: Option<(Knob, SimResult)> = None;
            for seconds in [1u64, 5, 15, 60] {
                let window = Duration::from_secs(seconds).max(config.step);
                let found = bisect(
                    |value| attempt(Knob { value, window }, progress),
                    availability,
                )
                .0;
                if let Some((knob, result)) = found
                    && best
                        .as_ref()
                        .is_none_or(|(_, b)| result.instance_seconds < b.instance_seconds)
                {
                    best = Some((knob_with(knob, window), result));
                }
            }
            finish(best, || {
                let knob = Knob { value: 0.3, window };
                (knob, attempt(knob, &mut |_, _| {}))
            })
        }
        _ => {
            let (best, fallback) = bisect(
                |value| attempt(Knob { value, window }, progress),
                availability,
            );
            finish(best.map(|(k, r)| (knob_with(k, window), r)), || {
                let knob = Knob {
                    value: fallback,
                    window,
                };
                (knob, attempt(knob, &mut |_, _| {}))
            })
        }
    }
}

fn knob_with(value: f64, window: Duration) -> Knob {
    Knob { value, window }
}

fn finish(best: Option<(Knob, SimResult)>, fallback: impl FnOnce() -> (Knob, SimResult)) -> Tuned {
    match best {
        Some((knob, train)) => Tuned {
            knob,
            train,
            reached: true,
        },
        None => {
            let (knob, train) = fallback();
            Tuned {
                knob,
                train,
                reached: false,
            }
        }
    }
}

/// Bisect a utilisation-like knob over [`KNOB_RANGE`] for the highest value that holds the
/// target. Returns the best (value, result) found, and the most generous value tried.
fn bisect(
    mut attempt: impl FnMut(f64) -> SimResult,
    availability: f64,
) -> (Option<(f64, SimResult)>, f64) {
    let (mut low, mut high) = (*KNOB_RANGE.start(), *KNOB_RANGE.end());
    let mut best = None;
    let first = attempt(low);
    if first.availability < availability {
        return (None, low);
    }
    best = best.or(Some((low, first)));
    for _ in 0..6 {
        let middle = (low + high) / 2.0;
        let result = attempt(middle);
        if result.availability >= availability {
            low = middle;
            best = Some((middle, result));
        } else {
            high = middle;
        }
    }
    // Try the top end too: some policies hold the target even there.
    let top = attempt(high);
    if top.availability >= availability {
        best = Some((high, top));
    }
    (best, *KNOB_RANGE.start())
}
