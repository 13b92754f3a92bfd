//! Scaling policies: Maru's own forecasting policy and the baselines it is judged against,
//! each a deterministic function of its observations.
//!
//! The baselines follow the documented behaviour of the systems they are named after:
//! - [`Hpa`]: Kubernetes Horizontal Pod Autoscaler (autoscaling/v2 defaults).
//! - [`Kpa`]: Knative Pod Autoscaler (stable and panic windows).
//! - [`AwsPredictive`]: AWS EC2 Auto Scaling predictive scaling with target tracking.
//! - [`Oracle`]: perfect foresight of arrivals, the lower bound (simulator only).

use std::collections::VecDeque;
use std::time::Duration;

use crate::forecast::{BurstGaps, Holt, ModelForecast, ModelKind, Rise, SeasonalHistory, quantile};
use crate::{Observation, Policy, ScalingBounds, clamp_desired};

/// A fixed number of instances.
#[derive(Debug, Clone)]
pub struct Static {
    pub instances: u32,
}

impl Policy for Static {
    fn desired(&mut self, bounds: &ScalingBounds, _: &Observation) -> u32 {
        clamp_desired(bounds, self.instances)
    }
}

/// Work in the system (executing plus waiting), per instance slot.
fn load(observation: &Observation) -> f64 {
    f64::from(observation.in_flight + observation.queued)
}

/// Turns cumulative arrival counts into a rate per second, sampled at most once per
/// [`RateMeter::SAMPLE`]. The simulator asks once per step (one second, or a minute for
/// per-minute traces); the gateway asks several times a second, through [`crate::Paced`]
/// which passes on about one call a second. A forecaster's smoothing is per sample, so the
/// policy itself makes sure it never sees shorter samples, whoever calls it.
#[derive(Debug, Clone, Default)]
struct RateMeter {
    last: Option<(Duration, u64)>,
}

impl RateMeter {
    const SAMPLE: Duration = Duration::from_secs(1);

    /// Arrivals per second since the previous sample and that sample's length in seconds,
    /// or `None` on the first call and until a whole [`Self::SAMPLE`] has passed.
    fn update(&mut self, observation: &Observation) -> Option<(f64, f64)> {
        let now = (observation.now, observation.arrivals_total);
        let Some((then, count)) = self.last else {
            self.last = Some(now);
            return None;
        };
        let elapsed = now.0.saturating_sub(then);
        if elapsed < Self::SAMPLE {
            return None;
        }
        self.last = Some(now);
        let seconds = elapsed.as_secs_f64();
        Some((now.1.saturating_sub(count) as f64 / seconds, seconds))
    }
}

/// Kubernetes HPA: `desired = ceil(current × metric / target)` evaluated every 15 s, with a
/// 10 % tolerance, scale-up limited to max(+4 pods, +100 %) per 15 s, and a 5 min
/// scale-down stabilisation window (the highest recommendation of the last 5 minutes wins).
/// The metric is utilisation: busy slots over ready slots (like CPU, it saturates at 100 %).
/// HPA never scales to zero: at least one instance stays.
#[derive(Debug, Clone)]
pub struct Hpa {
    pub target: f64,
    pub sync_period: Duration,
    pub tolerance: f64,
    pub stabilization: Duration,
    last_sync: Option<Duration>,
    current: u32,
    recommendations: VecDeque<(Duration, u32)>,
}

impl Hpa {
    pub fn new(target: f64) -> Self {
        Hpa {
            target: target.clamp(0.01, 1.0),
            sync_period: Duration::from_secs(15),
            tolerance: 0.1,
            stabilization: Duration::from_secs(300),
            last_sync: None,
            current: 0,
            recommendations: VecDeque::new(),
        }
    }
}

impl Policy for Hpa {
    fn desired(&mut self, bounds: &ScalingBounds, observation: &Observation) -> u32 {
        let floor = bounds.instances_min.max(1);
        if self.current == 0 {
            self.current = clamp_desired(bounds, floor);
        }
        let due = self
            .last_sync
            .is_none_or(|last| observation.now >= last + self.sync_period);
        if !due {
            return self.current;
        }
        self.last_sync = Some(observation.now);
        let ready = observation.ready.len() as u32;
        let slots = f64::from(ready.max(1) * bounds.concurrency.max(1));
        // Busy slots only: like CPU, the metric cannot see the queue beyond saturation.
        let utilisation = (f64::from(observation.in_flight) / slots).min(1.0);
        let ratio = utilisation / self.target;
        let base = ready.max(1);
        let mut recommendation = if (ratio - 1.0).abs() <= self.tolerance {
            self.current
        } else {
            (f64::from(base) * ratio).ceil() as u32
        };
        // Scale-up limit per period: the larger of +4 pods and +100 %.
        let up_limit = (self.current + 4).max(self.current * 2);
        recommendation = recommendation.min(up_limit);
        self.recommendations
            .push_back((observation.now, recommendation));
        while self
            .recommendations
            .front()
            .is_some_and(|(t, _)| observation.now.saturating_sub(*t) > self.stabilization)
        {
            self.recommendations.pop_front();
        }
        let stabilised = if recommendation < self.current {
            self.recommendations
                .iter()
                .map(|(_, r)| *r)
                .max()
                .unwrap_or(recommendation)
                .min(self.current)
        } else {
            recommendation
        };
        self.current = clamp_desired(bounds, stabilised.max(floor));
        self.current
    }
}

/// Knative KPA: desired = ceil(average concurrency / (per-instance concurrency × target)),
/// averaged over a 60 s stable window, with a 6 s panic window: when the panic-window
/// desired count reaches 200 % of the ready instances, the autoscaler panics, scales on the
/// panic window and never scales down until 60 s pass without the panic condition. Scales to
/// zero once the stable window has seen no traffic.
#[derive(Debug, Clone)]
pub struct Kpa {
    pub target: f64,
    pub stable_window: Duration,
    pub panic_window: Duration,
    pub panic_threshold: f64,
    samples: VecDeque<(Duration, f64)>,
    panicking_since: Option<Duration>,
    last_panic_condition: Option<Duration>,
    current: u32,
}

impl Kpa {
    pub fn new(target: f64) -> Self {
        Kpa {
            target: target.clamp(0.01, 1.0),
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            panic_threshold: 2.0,
            samples: VecDeque::new(),
            panicking_since: None,
            last_panic_condition: None,
            current: 0,
        }
    }

    fn average(&self, now: Duration, window: Duration) -> f64 {
        let values: Vec<f64> = self
            .samples
            .iter()
            .filter(|(t, _)| now.saturating_sub(*t) < window)
            .map(|(_, v)| *v)
            .collect();
        if values.is_empty() {
            0.0
        } else {
            values.iter().sum::<f64>() / values.len() as f64
        }
    }
}

impl Policy for Kpa {
    fn desired(&mut self, bounds: &ScalingBounds, observation: &Observation) -> u32 {
        let now = observation.now;
        self.samples.push_back((now, load(observation)));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.saturating_sub(*t) >= self.stable_window)
        {
            self.samples.pop_front();
        }
        let per_instance = f64::from(bounds.concurrency.max(1)) * self.target;
        let stable = (self.average(now, self.stable_window) / per_instance).ceil() as u32;
        let panic = (self.average(now, self.panic_window) / per_instance).ceil() as u32;
        let ready = (observation.ready.len() as u32).max(1);
        if f64::from(panic) / f64::from(ready) >= self.panic_threshold {
            self.last_panic_condition = Some(now);
            self.panicking_since.get_or_insert(now);
        } else if self.panicking_since.is_some()
            && self
                .last_panic_condition
                .is_none_or(|t| now.saturating_sub(t) >= self.stable_window)
        {
            self.panicking_since = None;
        }
        let desired = if self.panicking_since.is_some() {
            panic.max(self.current)
        } else {
            stable
        };
        self.current = clamp_desired(bounds, desired);
        self.current
    }
}

/// AWS predictive scaling with target tracking: an hourly load forecast made from up to 14
/// days of history, refreshed every 6 hours for the next 48 hours, sets the minimum capacity
/// a buffer (default 5 minutes) ahead of each hour; predictive scaling never scales in.
/// Target tracking on utilisation adds capacity above that minimum, scaling out at once and
/// in after a 300 s cooldown.
///
/// AWS's forecasting model is not public; this one predicts each hour as the mean of the
/// same hour on the days in the history window, which is what its documentation describes
/// it learning (daily and weekly patterns from 14 days).
#[derive(Debug, Clone)]
pub struct AwsPredictive {
    pub target: f64,
    pub buffer: Duration,
    history: SeasonalHistory,
    rate: RateMeter,
    forecast_made: Option<Duration>,
    /// (hour start, forecast rate per second) for the next 48 hours.
    forecast: Vec<(Duration, f64)>,
    per_instance_rate: ServiceRate,
    tracking: u32,
    last_scale_in: Duration,
}

impl AwsPredictive {
    pub fn new(target: f64) -> Self {
        AwsPredictive {
            target: target.clamp(0.01, 1.0),
            buffer: Duration::from_secs(300),
            history: SeasonalHistory::new(Duration::from_secs(3600), 14 * 24),
            rate: RateMeter::default(),
            forecast_made: None,
            forecast: Vec::new(),
            per_instance_rate: ServiceRate::default(),
            tracking: 0,
            last_scale_in: Duration::ZERO,
        }
    }
}

const HOUR: Duration = Duration::from_secs(3600);

impl Policy for AwsPredictive {
    fn desired(&mut self, bounds: &ScalingBounds, observation: &Observation) -> u32 {
        let now = observation.now;
        if let Some((rate, _)) = self.rate.update(observation) {
            self.history.record(now, rate);
            self.per_instance_rate.update(bounds, observation, rate);
        }
        if self.forecast_made.is_none_or(|made| now >= made + 6 * HOUR)
            && self.history.days_covered() >= 1.0
        {
            self.forecast_made = Some(now);
            let start = Duration::from_secs(now.as_secs() / 3600 * 3600);
            self.forecast = (0..48u32)
                .map(|h| {
                    (
                        start + h * HOUR,
                        self.history.seasonal_mean(start + h * HOUR, 24),
                    )
                })
                .collect();
        }
        let ahead = now + self.buffer;
        let predicted_rate = self
            .forecast
            .iter()
            .rev()
            .find(|(hour, _)| *hour <= ahead)
            .map(|(_, r)| *r)
            .unwrap_or(0.0);
        let capacity = self.per_instance_rate.per_instance(bounds) * self.target;
        let predictive_min = if capacity > 0.0 {
            (predicted_rate / capacity).ceil() as u32
        } else {
            0
        };

        let ready = observation.ready.len() as u32;
        let slots = f64::from(ready.max(1) * bounds.concurrency.max(1));
        let utilisation = f64::from(observation.in_flight) / slots;
        let wanted = ((f64::from(ready.max(1)) * utilisation / self.target).ceil() as u32).max(1);
        if wanted > self.tracking || ready == 0 && observation.queued > 0 {
            self.tracking = wanted.max(1);
        } else if wanted < self.tracking
            && now.saturating_sub(self.last_scale_in) >= Duration::from_secs(300)
        {
            self.tracking = wanted;
            self.last_scale_in = now;
        }
        clamp_desired(bounds, self.tracking.max(predictive_min).max(1))
    }
}

/// Estimates how many requests per second one instance completes, from Little's law
/// (in flight = rate × service time) while the service is not overloaded.
#[derive(Debug, Clone, Default)]
struct ServiceRate {
    service_seconds: Option<f64>,
}

impl ServiceRate {
    fn update(&mut self, bounds: &ScalingBounds, observation: &Observation, arrival_rate: f64) {
        let slots = observation.ready.len() as u32 * bounds.concurrency.max(1);
        if arrival_rate > 0.5 && observation.queued == 0 && observation.in_flight < slots {
            let sample = f64::from(observation.in_flight) / arrival_rate;
            if sample > 0.0 {
                self.service_seconds = Some(match self.service_seconds {
                    Some(previous) => 0.95 * previous + 0.05 * sample,
                    None => sample,
                });
            }
        }
    }

    /// Requests per second one instance serves; until measured, assumes 100 ms per request.
    fn per_instance(&self, bounds: &ScalingBounds) -> f64 {
        f64::from(bounds.concurrency.max(1)) / self.service_seconds.unwrap_or(0.1).max(1e-4)
    }
}

/// How cautious a service wants its scaling: an authentication service conservative, a
/// game-data service aggressive.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Caution {
    /// Quantile of forecast error provisioned for.
    pub quantile: f64,
    /// Target utilisation of provisioned capacity.
    pub utilisation: f64,
}

impl Caution {
    pub const CONSERVATIVE: Caution = Caution {
        quantile: 0.999,
        utilisation: 0.6,
    };
    pub const NORMAL: Caution = Caution {
        quantile: 0.99,
        utilisation: 0.75,
    };
    pub const AGGRESSIVE: Caution = Caution {
        quantile: 0.95,
        utilisation: 0.9,
    };

    pub fn parse(text: &str) -> Option<Caution> {
        match text {
            "conservative" => Some(Self::CONSERVATIVE),
            "normal" => Some(Self::NORMAL),
            "aggressive" => Some(Self::AGGRESSIVE),
            _ => None,
        }
    }
}

/// Maru's policy: forecast demand over the instance start-up lead time and provision for an
/// upper quantile of it, with a reactive guard for what no forecast sees (the work already
/// here and, where start-up is longer than the service's latency objective, a rise going
/// on as far again: [`Rise`]), and scale down slowly (hysteresis): ten minutes after the
/// forecast fell where the service's bursts have been coming back within ten minutes, one
/// minute elsewhere ([`BurstGaps`]). Where at least 60 % of the recent bursts start in the
/// same three minutes of every hour or half hour, capacity for their median peak is ready
/// when those minutes come, if start-up is longer than the service's latency objective.
///
/// Three forecasters compete, each scored by rolling backtest (every forecast against what
/// then arrived, a rolling mean absolute error); the one with the lowest error is the
/// champion:
/// - short-term: Holt's smoothing of the per-second arrival rate (level and damped trend);
/// - seasonal: once a day of history exists, the same minute on earlier days;
/// - augurs' model, refitted every hour on up to four days of 5-minute means: MSTL (a daily
///   season, its trend forecast by AutoETS) when augurs' periodogram detects a daily period,
///   else AutoETS alone ([`ModelForecast`]).
///
/// The seasonal and model forecasts are rescaled by how the current level (Holt's) compares
/// with what they expected for now, so a forecast fitted up to an hour ago follows a level
/// shift. The provisioned rate is the champion's forecast times the `caution.quantile` of
/// recent relative errors (the last 2,000 samples), a margin that fades with evidence: it
/// is never more than the largest error of the last [`Self::error_memory`] (enough calm
/// samples that an error as large as the margin would almost surely have come again), so a
/// one-off burst's errors stop counting minutes after it, not when they leave the window.
#[derive(Debug, Clone)]
pub struct Predictive {
    pub caution: Caution,
    /// Instance start-up time, the forecast horizon.
    pub lead: Duration,
    /// How long the forecast must stay low before the capacity it asked for is released,
    /// while bursts have been coming back within this time (what the reactive guard asked
    /// for is held for two start-up times).
    pub burst_hold: Duration,
    /// The same while they have not (or fewer than three gaps between bursts have been
    /// seen).
    pub release_delay: Duration,
    /// The service's latency objective. Bursts that keep a clock rhythm are provisioned
    /// ahead of, and the guard asks for a rise to go on, only when start-up takes longer
    /// than it (with a shorter start-up, a burst that finds too little capacity waits about
    /// a start-up time for the guard's instances, within its objective or close to it);
    /// without one, always.
    pub slo: Option<Duration>,
    rate: RateMeter,
    /// How soon bursts come back, which picks the hold.
    bursts: BurstGaps,
    /// How far the rate is rising, for the guard.
    rise: Rise,
    /// The rate if the rise seen at the last sample goes on as far again.
    rising: Option<f64>,
    holt: Holt,
    seasonal: SeasonalHistory,
    per_instance_rate: ServiceRate,
    /// augurs' model (MSTL or ETS) fitted on 5-minute means, refitted every
    /// [`Self::REFIT_EVERY`]; and when it was last fitted or tried.
    model: Option<ModelForecast>,
    model_tried: Option<Duration>,
    /// Index in [`Candidates`] of the champion at the last step.
    champion_now: usize,
    /// Forecasts made `lead` ago, to score against what arrived: (for time, chosen forecast,
    /// each candidate's forecast).
    pending: VecDeque<(Duration, f64, Candidates)>,
    /// Rolling mean absolute error of each candidate, in [`Candidates`] order.
    backtest: [Option<f64>; 3],
    /// Recent relative errors (actual / forecast), newest last.
    errors: VecDeque<f64>,
    /// Instances the forecast asked for, held `burst_hold` or `release_delay`.
    forecast_asks: HeldMax<u32>,
    /// Instances the guard asked for, held two start-up times.
    guard_asks: HeldMax<u32>,
    /// The largest recent relative error, over [`Self::error_memory`].
    recent_errors: HeldMax<f64>,
    last_forecast: Option<f64>,
    /// Length in seconds of the last rate sample, the unit of Holt's steps.
    sample_seconds: f64,
    /// The error quantile, recomputed every [`Self::MARGIN_EVERY`] samples.
    margin: Option<f64>,
    since_margin: u32,
}

impl Predictive {
    pub fn new(caution: Caution, lead: Duration) -> Self {
        Predictive {
            caution,
            lead,
            // Ten minutes (or two start-up times if longer) where bursts come back within
            // that, one minute (or two start-up times) elsewhere. Chosen with `maru sim
            // --tune` over all shared traces (BENCHMARKS.md): with one minute everywhere,
            // bursts that come back within minutes (NASA's, about two minutes apart) found
            // capacity gone and the tuning settled on low utilisation instead; with ten
            // minutes everywhere, traces whose bursts are hours apart (Twitter's) or that
            // have none (World Cup) paid for capacity nothing came back for.
            burst_hold: Duration::from_secs(600).max(lead * 2),
            release_delay: Duration::from_secs(60).max(lead * 2),
            slo: None,
            rate: RateMeter::default(),
            bursts: BurstGaps::default(),
            rise: Rise::default(),
            rising: None,
            // Smoothing of level and trend per rate sample (a second, or a step of a
            // per-minute trace). Chosen with `maru sim --tune` over all shared traces and
            // start-ups (BENCHMARKS.md): 0.3 and 0.05 chased per-second noise (World Cup cost
            // more than hpa, Twitter at 30 s missed 99.9 %); 0.1 and 0.01 reacted too slowly
            // to NASA's bursts at 1 s.
            holt: Holt::new(0.2, 0.02),
            seasonal: SeasonalHistory::new(Duration::from_secs(60), 14 * 24 * 60),
            per_instance_rate: ServiceRate::default(),
            model: None,
            model_tried: None,
            champion_now: 0,
            pending: VecDeque::new(),
            backtest: [None; 3],
            errors: VecDeque::new(),
            forecast_asks: HeldMax::default(),
            guard_asks: HeldMax::default(),
            recent_errors: HeldMax::default(),
            last_forecast: None,
            sample_seconds: RateMeter::SAMPLE.as_secs_f64(),
            margin: None,
            since_margin: 0,
        }
    }

    /// The same policy for a service with latency objective `slo`.
    pub fn with_slo(self, slo: Option<Duration>) -> Self {
        Predictive { slo, ..self }
    }

    const ERRORS_KEPT: usize = 2000;
    const REFIT_EVERY: Duration = Duration::from_secs(3600);
    const MODEL_DAYS: usize = 4;
    const MARGIN_EVERY: u32 = 60;
    /// The guard asks for instances enough to serve waiting work within this once ready.
    const QUEUE_DRAIN: Duration = Duration::from_secs(1);

    /// How long what the forecast asked for is held: `burst_hold` while the service's
    /// bursts have been coming back within it, else `release_delay`.
    fn hold(&self) -> Duration {
        if self.bursts.return_within(self.burst_hold) {
            self.burst_hold
        } else {
            self.release_delay
        }
    }

    /// Calm samples that outweigh a burst's errors: enough that the caution's quantile of
    /// errors would almost surely (95 %) have been exceeded among them if errors were still
    /// as large: n = 3 / (1 − q), since q^n ≈ e^−3. 300 samples (five minutes of one-second
    /// samples) at the normal caution's 0.99, 60 at the aggressive 0.95; at the conservative
    /// 0.999 more than the error window keeps, so a conservative service forgets a burst
    /// only as the window does.
    fn error_memory(&self) -> Duration {
        let samples = (3.0 / (1.0 - self.caution.quantile).max(1e-6)).ceil();
        Duration::from_secs_f64(self.sample_seconds * samples).max(self.hold())
    }

    /// Every candidate's forecast of the rate at `now + horizon`: the short-term one always,
    /// the seasonal one with a day of history, augurs' model once fitted.
    fn forecasts(&self, now: Duration, horizon: Duration) -> Candidates {
        let short = self
            .holt
            .forecast(horizon.as_secs_f64() / self.sample_seconds);
        // Today's level against a reference for now, to rescale a forecast made from
        // earlier data to the level seen now.
        let level = |reference: f64| {
            if reference > 1e-9 {
                (self.holt.level() / reference).clamp(0.25, 4.0)
            } else {
                1.0
            }
        };
        // Seasonal: the same minute on earlier days, scaled by how today compares with them.
        let seasonal = (self.seasonal.days_covered() >= 1.0).then(|| {
            let seasonal_then = self.seasonal.seasonal_mean(now + horizon, 24 * 60);
            seasonal_then * level(self.seasonal.seasonal_mean(now, 24 * 60))
        });
        let model = self.model.as_ref().and_then(|model| {
            let then = model.at(now + horizon)?;
            Some(then * level(model.at(now)?))
        });
        [Some(short), seasonal, model]
    }

    /// The champion: the candidate with the lowest rolling backtest error among those with
    /// a forecast now; the short-term forecast until others have been scored.
    fn champion(&self, candidates: &Candidates) -> (usize, f64) {
        candidates
            .iter()
            .zip(self.backtest)
            .enumerate()
            .filter_map(|(i, (forecast, error))| Some((i, (*forecast)?, error?)))
            .min_by(|a, b| a.2.total_cmp(&b.2))
            .map_or((0, candidates[0].unwrap_or(0.0)), |(i, forecast, _)| {
                (i, forecast)
            })
    }

    /// The forecaster that was champion at the last step: "short-term", "seasonal", "mstl"
    /// or "ets".
    fn champion_name(&self) -> &'static str {
        match self.champion_now {
            1 => "seasonal",
            2 => match self.model.as_ref().map(|model| model.kind) {
                Some(ModelKind::Mstl) => "mstl",
                _ => "ets",
            },
            _ => "short-term",
        }
    }

    /// Refits augurs' model on the last days of 5-minute means, at most every
    /// [`Self::REFIT_EVERY`], with a path long enough to reach `horizon` past the next refit.
    fn refit(&mut self, now: Duration, horizon: Duration) {
        if self
            .model_tried
            .is_some_and(|tried| now < tried + Self::REFIT_EVERY)
        {
            return;
        }
        self.model_tried = Some(now);
        // The seasonal history holds one-minute means; the model sees five-minute ones.
        const MINUTES_PER_STEP: u64 = 5;
        const STEP: Duration = Duration::from_secs(60 * MINUTES_PER_STEP);
        let steps_per_day = (24 * 60 / MINUTES_PER_STEP) as usize;
        let (series, end) =
            self.seasonal
                .recent_means(now, MINUTES_PER_STEP, Self::MODEL_DAYS * steps_per_day);
        let ahead = (now + Self::REFIT_EVERY + horizon).saturating_sub(end);
        let steps = (ahead.as_secs_f64() / STEP.as_secs_f64()).ceil() as usize + 1;
        self.model = ModelForecast::fit(&series, STEP, end, steps);
    }
}

/// Candidate forecasts: short-term (Holt), seasonal (same time on earlier days), augurs'
/// model (MSTL or ETS).
type Candidates = [Option<f64>; 3];

impl Policy for Predictive {
    fn forecast(&self) -> Option<f64> {
        self.last_forecast
    }

    fn forecaster(&self) -> Option<&'static str> {
        self.last_forecast.map(|_| self.champion_name())
    }

    fn learn(&mut self, past: &[(Duration, f64)]) {
        // Bursts are judged from live samples only: the kept history's minute means hide a
        // minute's peak, so a restarted service holds capacity one minute until it has seen
        // its bursts come back again.
        for &(at, rate) in past {
            if rate.is_finite() && rate >= 0.0 {
                self.seasonal.record(at, rate);
            }
        }
        if let Some(&(_, rate)) = past.last() {
            self.holt.update(rate);
        }
    }

    fn desired(&mut self, bounds: &ScalingBounds, observation: &Observation) -> u32 {
        let now = observation.now;
        let lead = observation
            .startup_last
            .map_or(self.lead, |measured| measured.max(self.lead));
        // Forecasting, scoring and the error margin move once per rate sample (and at the
        // first call, which may follow history handed over by `learn`); if asked between
        // samples, the last forecast stands and only the guard below sees the newer
        // observation.
        let sample = self.rate.update(observation);
        if let Some((rate, seconds)) = sample {
            self.sample_seconds = seconds;
            self.holt.update(rate);
            self.seasonal.record(now, rate);
            self.per_instance_rate.update(bounds, observation, rate);
            self.bursts
                .record(now, rate, self.per_instance_rate.per_instance(bounds));
            self.rising = self
                .rise
                .record(now, rate, Duration::from_secs_f64(seconds), lead);
            while let Some(&(at, predicted, candidates)) = self.pending.front() {
                if at > now {
                    break;
                }
                self.pending.pop_front();
                for (forecast, error) in candidates.iter().zip(self.backtest.iter_mut()) {
                    if let Some(forecast) = forecast {
                        let miss = (forecast - rate).abs();
                        *error = Some(error.map_or(miss, |e| 0.99 * e + 0.01 * miss));
                    }
                }
                // Errors are ratios on a floor of one instance's worth of demand, so a miss of a
                // few requests at a near-zero forecast is not a thousandfold error.
                let floor = self.per_instance_rate.per_instance(bounds);
                if predicted > 0.5 || rate > 0.5 {
                    let error = (rate + floor) / (predicted + floor);
                    let memory = self.error_memory();
                    self.recent_errors.record(now, error, memory);
                    self.errors.push_back(error);
                    if self.errors.len() > Self::ERRORS_KEPT {
                        self.errors.pop_front();
                    }
                }
            }
        }
        if sample.is_some() || self.last_forecast.is_none() {
            // Capacity decided now serves from when it is ready until the next decision.
            let horizon = lead + Duration::from_secs_f64(self.sample_seconds);
            self.refit(now, horizon);
            let candidates = self.forecasts(now, horizon);
            let (champion, forecast) = self.champion(&candidates);
            self.champion_now = champion;
            self.last_forecast = Some(forecast);
            self.pending
                .push_back((now + horizon, forecast, candidates));
            self.since_margin += 1;
            if self.errors.len() >= 30
                && (self.margin.is_none() || self.since_margin >= Self::MARGIN_EVERY)
            {
                self.margin =
                    Some(quantile(self.errors.iter().copied(), self.caution.quantile).max(1.0));
                self.since_margin = 0;
            }
        }
        let forecast = self.last_forecast.unwrap_or(0.0);
        // The margin fades with evidence: errors no larger than some value throughout the
        // error memory show the window's larger ones (a one-off burst's) are no longer what
        // the forecast misses by. No error recorded in it (no traffic, none forecast): the
        // forecast has been right.
        let memory = self.error_memory();
        let error_margin = self.margin.map_or(2.0, |margin| {
            let recent = self.recent_errors.largest(now, memory).unwrap_or(1.0);
            margin.min(recent).max(1.0)
        });
        // The margin applies to errors on a floor of one instance's worth of demand.
        let per_instance = self.per_instance_rate.per_instance(bounds);
        let provisioned_rate = ((forecast + per_instance) * error_margin - per_instance).max(0.0);
        let capacity = per_instance * self.caution.utilisation;
        let forecast_instances = if capacity > 0.0 {
            (provisioned_rate / capacity).ceil() as u32
        } else {
            0
        };
        // Reactive guard: never fewer than the work already here needs: what is executing,
        // at the caution's utilisation, and instances enough to serve what waits within
        // [`Self::QUEUE_DRAIN`] once ready. One instance per waiting request (as before)
        // overshot: an instance serves many short requests in the time others take to
        // start, and the overshoot was held for two start-up times (World Cup at 30 s cost
        // 1.10x what this costs, BENCHMARKS.md).
        let executing = f64::from(observation.in_flight)
            / (f64::from(bounds.concurrency.max(1)) * self.caution.utilisation);
        let drained_per_instance = (per_instance * Self::QUEUE_DRAIN.as_secs_f64()).max(1.0);
        let here = executing + f64::from(observation.queued) / drained_per_instance;
        // And, when start-up is longer than the latency objective, the newest rate plus as
        // much again as it rose over the last lead, at the caution's utilisation: a surge
        // seen starting may go on while the instances asked for start ([`Rise`]). Without
        // it, Azure's one large spike at 120 s start-up (a doubling for a minute, five times
        // the level four minutes later) found almost a fifth of the capacity it needed
        // missing (BENCHMARKS.md). With a shorter start-up the guard's instances come
        // within the objective, as for the rhythm below.
        // What waits for a start-up longer than the objective misses it: only then is
        // capacity asked for ahead of what is already here.
        let ahead = self.slo.is_none_or(|slo| lead > slo);
        let rising = self
            .rising
            .filter(|_| ahead && capacity > 0.0)
            .map_or(0.0, |rate| rate / capacity);
        let guard = here.max(rising).ceil() as u32;
        // Hysteresis: release capacity only when it has not been wanted for a while. What
        // the forecast wanted is held for `burst_hold` if bursts have been coming back
        // within it, else for `release_delay`; what the guard wanted (work already here,
        // a rise going on) for two start-up times, since an instance released now cannot be
        // back sooner: with a 1 s start-up a burst's instances go once it has passed.
        let hold = self.hold();
        let held_forecast = self.forecast_asks.record(now, forecast_instances, hold);
        let held_guard = self.guard_asks.record(now, guard, lead * 2);
        // Bursts that start at the same minutes of every hour or half hour (scheduled
        // work): capacity for their median peak, ready when their window opens and kept
        // until it closes; the guard holds what a burst that came needs from then on. At
        // full utilisation: the forecast's margin and the guard's headroom take over one
        // start-up time into a burst (provisioning for the peak at the caution's
        // utilisation cost Twitter 1.2x as much at 120 s start-up, measured when the peak
        // was a burst's first minute's, BENCHMARKS.md).
        let rhythm = self
            .bursts
            .expected_burst(now, lead)
            .filter(|_| ahead && per_instance > 0.0)
            .map_or(0, |peak| (peak / per_instance).ceil() as u32);
        clamp_desired(bounds, held_forecast.max(held_guard).max(rhythm))
    }
}

/// The largest of the values recorded within a hold time, in constant amortised time: only
/// values not overshadowed by a later, larger one are kept (a monotonic queue). The hold may
/// change between calls (a measured start-up time longer than configured lengthens it);
/// values are kept for the longest hold asked so far.
#[derive(Debug, Clone)]
struct HeldMax<T> {
    /// (when, value), times increasing and values strictly decreasing from front to back.
    kept: VecDeque<(Duration, T)>,
    longest: Duration,
}

impl<T> Default for HeldMax<T> {
    fn default() -> Self {
        HeldMax {
            kept: VecDeque::new(),
            longest: Duration::ZERO,
        }
    }
}

impl<T: PartialOrd + Copy> HeldMax<T> {
    /// Record `value` at `now` and return the largest value recorded within `hold` of now.
    fn record(&mut self, now: Duration, value: T, hold: Duration) -> T {
        while self.kept.back().is_some_and(|&(_, kept)| kept <= value) {
            self.kept.pop_back();
        }
        self.kept.push_back((now, value));
        self.largest(now, hold).unwrap_or(value)
    }

    /// The largest value recorded within `hold` of `now`, if any was.
    fn largest(&mut self, now: Duration, hold: Duration) -> Option<T> {
        self.longest = self.longest.max(hold);
        while self
            .kept
            .front()
            .is_some_and(|&(at, _)| now.saturating_sub(at) > self.longest)
        {
            self.kept.pop_front();
        }
        // The first value within the hold is the largest there.
        self.kept
            .iter()
            .find(|&&(at, _)| now.saturating_sub(at) <= hold)
            .map(|&(_, largest)| largest)
    }
}

/// Perfect foresight: at each moment, the capacity that covers the highest arrival rate
/// between now and the end of the window that starts when an instance asked for now would be
/// ready (an instance released now could not come back sooner). Exists only in the
/// simulator, as the lower bound every policy is measured against. Its knobs are the window
/// (smoothing) and the utilisation it runs instances at.
#[derive(Debug, Clone)]
pub struct Oracle {
    /// Future arrivals per second, one value per simulation step.
    rates: std::sync::Arc<[f64]>,
    step: Duration,
    lead_steps: usize,
    window_steps: usize,
    per_instance_rate: f64,
    utilisation: f64,
}

impl Oracle {
    pub fn new(
        rates: std::sync::Arc<[f64]>,
        step: Duration,
        lead: Duration,
        window: Duration,
        per_instance_rate: f64,
        utilisation: f64,
    ) -> Self {
        let steps = |d: Duration| (d.as_secs_f64() / step.as_secs_f64()).ceil() as usize;
        Oracle {
            rates,
            step,
            lead_steps: steps(lead),
            window_steps: steps(window).max(1),
            per_instance_rate,
            utilisation: utilisation.clamp(0.01, 1.0),
        }
    }
}

impl Policy for Oracle {
    fn desired(&mut self, bounds: &ScalingBounds, observation: &Observation) -> u32 {
        let index = (observation.now.as_secs_f64() / self.step.as_secs_f64()).round() as usize;
        // An instance removed now cannot be back before `lead` has passed, so keep what any
        // moment from now until an instance asked for now would be ready (plus the window)
        // needs; add exactly `lead` ahead of need.
        let from = index.min(self.rates.len());
        let to = (index + self.lead_steps + self.window_steps).min(self.rates.len());
        let peak = self.rates[from..to].iter().copied().fold(0.0, f64::max);
        // Also cover work already waiting, which foresight of arrivals alone does not see.
        let backlog = load(observation) / f64::from(bounds.concurrency.max(1));
        let needed = (peak / (self.per_instance_rate * self.utilisation))
            .ceil()
            .max(backlog.ceil());
        clamp_desired(bounds, needed as u32)
    }
}

#[cfg(test)]
mod tests;
