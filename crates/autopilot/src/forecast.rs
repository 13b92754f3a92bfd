//! Forecasting building blocks, all computed from values handed in (no I/O, no clock).

use std::collections::VecDeque;
use std::time::Duration;

use augurs_core::{Fit, Predict};
use augurs_ets::AutoETS;
use augurs_mstl::MSTLModel;
use augurs_seasons::{Detector, PeriodogramDetector};

/// Holt's linear exponential smoothing: a level and a trend.
#[derive(Debug, Clone)]
pub struct Holt {
    alpha: f64,
    beta: f64,
    state: Option<(f64, f64)>,
}

impl Holt {
    pub fn new(alpha: f64, beta: f64) -> Self {
        Holt {
            alpha,
            beta,
            state: None,
        }
    }

    pub fn update(&mut self, value: f64) {
        self.state = Some(match self.state {
            None => (value, 0.0),
            Some((level, trend)) => {
                let next = self.alpha * value + (1.0 - self.alpha) * (level + trend);
                (next, self.beta * (next - level) + (1.0 - self.beta) * trend)
            }
        });
    }

    pub fn level(&self) -> f64 {
        self.state.map(|(level, _)| level).unwrap_or(0.0)
    }

    /// The value `steps` observations ahead, never negative.
    pub fn forecast(&self, steps: f64) -> f64 {
        // The trend is damped (φ = 0.98 per step): a trend seen over seconds is not projected
        // undiminished over minutes. Σ φ^i for i in 1..=steps.
        const PHI: f64 = 0.98;
        let damped_steps = PHI * (1.0 - PHI.powf(steps.max(0.0))) / (1.0 - PHI);
        self.state
            .map(|(level, trend)| (level + trend * damped_steps).max(0.0))
            .unwrap_or(0.0)
    }
}

/// Mean values in fixed-width time buckets, for seasonal look-ups ("the same minute on
/// earlier days"). Bounded: keeps the last `capacity` buckets.
#[derive(Debug, Clone)]
pub struct SeasonalHistory {
    width: Duration,
    capacity: usize,
    /// (bucket index, sum, count), oldest first, contiguous.
    buckets: VecDeque<(u64, f64, u32)>,
}

impl SeasonalHistory {
    pub fn new(width: Duration, capacity: usize) -> Self {
        SeasonalHistory {
            width,
            capacity: capacity.max(1),
            buckets: VecDeque::new(),
        }
    }

    fn index(&self, at: Duration) -> u64 {
        at.as_secs() / self.width.as_secs().max(1)
    }

    pub fn record(&mut self, at: Duration, value: f64) {
        let index = self.index(at);
        match self.buckets.back_mut() {
            Some((last, sum, count)) if *last == index => {
                *sum += value;
                *count += 1;
            }
            Some((last, _, _)) if *last > index => {} // late sample; ignore
            _ => {
                // Fill skipped buckets with nothing recorded (count 0) to keep indices contiguous.
                let mut next = self.buckets.back().map(|(i, _, _)| i + 1).unwrap_or(index);
                while next < index {
                    self.buckets.push_back((next, 0.0, 0));
                    next += 1;
                }
                self.buckets.push_back((index, value, 1));
            }
        }
        while self.buckets.len() > self.capacity {
            self.buckets.pop_front();
        }
    }

    fn mean_at(&self, index: u64) -> Option<f64> {
        let first = self.buckets.front()?.0;
        let (_, sum, count) = self
            .buckets
            .get(usize::try_from(index.checked_sub(first)?).ok()?)?;
        (*count > 0).then(|| sum / f64::from(*count))
    }

    /// Means over consecutive groups of `per_group` complete buckets, oldest first, at
    /// most `groups` of them, ending with the last group that is complete at `now` (the
    /// bucket `now` falls in is not complete). A bucket with nothing recorded carries the
    /// previous bucket's mean. Also returns the time at which the last group ends.
    pub fn recent_means(
        &self,
        now: Duration,
        per_group: u64,
        groups: usize,
    ) -> (Vec<f64>, Duration) {
        let per_group = per_group.max(1);
        // Groups are aligned to multiples of `per_group` buckets.
        let end = self.index(now) / per_group * per_group;
        let first_held = self.buckets.front().map_or(end, |(i, _, _)| *i);
        let first_group = first_held.div_ceil(per_group) * per_group;
        let count = usize::try_from((end.saturating_sub(first_group)) / per_group)
            .unwrap_or(usize::MAX)
            .min(groups);
        let start = end - count as u64 * per_group;
        let mut previous = 0.0;
        let mut means = Vec::with_capacity(count);
        for group in 0..count as u64 {
            let mut sum = 0.0;
            for index in start + group * per_group..start + (group + 1) * per_group {
                if let Some(mean) = self.mean_at(index) {
                    previous = mean;
                }
                sum += previous;
            }
            means.push(sum / per_group as f64);
        }
        let width = self.width.as_secs();
        (means, Duration::from_secs(end * width))
    }

    /// Days of history held.
    pub fn days_covered(&self) -> f64 {
        self.buckets.len() as f64 * self.width.as_secs_f64() / 86_400.0
    }

    /// Mean of the values one, two, … periods (of `period` buckets) before `at`, over the
    /// complete buckets held; 0 when there are none.
    pub fn seasonal_mean(&self, at: Duration, period: u64) -> f64 {
        let index = self.index(at);
        let current = self.buckets.back().map(|(i, _, _)| *i).unwrap_or(0);
        let mut values = Vec::new();
        let mut back = index;
        while back >= period {
            back -= period;
            if back < current {
                match self.mean_at(back) {
                    Some(value) => values.push(value),
                    None if self
                        .buckets
                        .front()
                        .is_some_and(|(first, _, _)| back < *first) =>
                    {
                        break;
                    }
                    None => {}
                }
            }
        }
        if values.is_empty() {
            0.0
        } else {
            values.iter().sum::<f64>() / values.len() as f64
        }
    }
}

/// Which of augurs' models a [`ModelForecast`] was fitted with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// MSTL decomposition with a daily season, its trend forecast by AutoETS.
    Mstl,
    /// AutoETS alone (no daily season detected, or too little history for one).
    Ets,
}

/// A forecast path from augurs' statistical models, fitted on a series of equally spaced
/// means (for the policy: 5-minute means of the arrival rate). A daily season is used when
/// the series holds two days and augurs' periodogram finds a period within a quarter of a
/// day's length; MSTL then separates it from the trend, which AutoETS forecasts. Without a
/// daily season, AutoETS (error, trend and damping chosen by AICc) forecasts the series.
#[derive(Debug, Clone)]
pub struct ModelForecast {
    pub kind: ModelKind,
    /// When the series ended: `path[k]` is the forecast for the step that starts
    /// `k` steps after it.
    pub start: Duration,
    pub step: Duration,
    pub path: Vec<f64>,
}

impl ModelForecast {
    /// Fits a model to `series` (one value per `step`, ending at `end`) and forecasts
    /// `steps` ahead. `None` when the series is too short or no model fits it.
    pub fn fit(series: &[f64], step: Duration, end: Duration, steps: usize) -> Option<Self> {
        const MIN_STEPS: usize = 24;
        if series.len() < MIN_STEPS || step.is_zero() || series.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let per_day = usize::try_from(86_400 / step.as_secs().max(1)).ok()?;
        let (kind, path) = if daily_season(series, per_day) {
            let model = MSTLModel::new(vec![per_day], AutoETS::non_seasonal().into_trend_model());
            let fitted = model.fit(series).ok()?;
            (ModelKind::Mstl, fitted.predict(steps, None).ok()?.point)
        } else {
            let fitted = AutoETS::non_seasonal().fit(series).ok()?;
            (ModelKind::Ets, fitted.predict(steps, None).ok()?.point)
        };
        path.iter().all(|v| v.is_finite()).then(|| ModelForecast {
            kind,
            start: end,
            step,
            path: path.into_iter().map(|v| v.max(0.0)).collect(),
        })
    }

    /// The forecast for `at`, interpolated between steps (each step's value sits at its
    /// middle); `None` outside the path.
    pub fn at(&self, at: Duration) -> Option<f64> {
        let position = at.checked_sub(self.start)?.as_secs_f64() / self.step.as_secs_f64() - 0.5;
        let below = position.floor().max(0.0);
        let lower = *self.path.get(below as usize)?;
        let upper = self.path.get(below as usize + 1).copied().unwrap_or(lower);
        let fraction = (position - below).clamp(0.0, 1.0);
        Some(lower + (upper - lower) * fraction)
    }
}

/// Whether `series` (of `per_day` values a day) has a daily season: it must hold two days,
/// and augurs' periodogram must find a period within a quarter of a day's length.
fn daily_season(series: &[f64], per_day: usize) -> bool {
    if per_day < 4 || series.len() < 2 * per_day {
        return false;
    }
    let day = u32::try_from(per_day).unwrap_or(u32::MAX);
    let detector = PeriodogramDetector::builder()
        .min_period(day - day / 4)
        .max_period(day + day / 4)
        .build();
    !detector.detect(series).is_empty()
}

/// How soon bursts come back: the gaps between bursts of a rate, in whole minutes. A minute
/// is a burst when its highest sample is at least twice the mean of the (up to sixty)
/// minutes recorded before it, and at least `floor` above that mean (for the policy, one
/// instance's worth of demand, so a near-idle service's noise is not a burst); consecutive
/// burst minutes are one burst.
/// Also whether bursts keep a clock rhythm: at least 60 % of the last 20 starting in the
/// same three minutes of every hour or half hour ([`BurstGaps::expected_burst`]).
/// Bounded: keeps the last 20 gaps, the last 20 burst starts and an hour of minute means.
#[derive(Debug, Clone, Default)]
pub struct BurstGaps {
    /// The minute being gathered: (index, highest sample, sum, count).
    current: Option<(u64, f64, f64, u32)>,
    /// Means of the last complete minutes, oldest first, at most an hour of them.
    means: VecDeque<f64>,
    last_burst: Option<u64>,
    /// Minutes from one burst's last minute to the next's first, oldest first.
    gaps: VecDeque<u64>,
    /// Median of `gaps` in seconds, once three are known; kept up to date as gaps are
    /// added, since the policy asks on every call.
    median_gap: Option<f64>,
    /// First minute and highest sample of the last bursts, oldest first.
    onsets: VecDeque<(u64, f64)>,
    /// The clock rhythm the kept bursts start to, if they keep one.
    rhythm: Option<Rhythm>,
}

/// Bursts that start in the same few minutes of every hour or half hour, as scheduled
/// work does: the period, the window's first minute within it, the median highest sample
/// of the bursts that started in the window, and the minute the last of them started.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Rhythm {
    period_minutes: u64,
    start_minute: u64,
    peak: f64,
    last_minute: u64,
}

impl BurstGaps {
    const GAPS_KEPT: usize = 20;
    const ONSETS_KEPT: usize = 20;
    /// Burst starts needed before a rhythm is looked for.
    const ONSETS_NEEDED: usize = 8;
    /// Clock periods a rhythm may have.
    const PERIODS_MINUTES: [u64; 2] = [30, 60];
    /// How many minutes a rhythm's window spans.
    const WINDOW_MINUTES: u64 = 3;
    /// A rhythm lapses when no burst has started in its window for this long (the
    /// scheduled work stopped): over twice Twitter's longest wait between bursts in its
    /// window (5.5 hours).
    const RHYTHM_LAPSES_MINUTES: u64 = 12 * 60;
    const HOUR: usize = 60;
    /// Minute means needed before a minute can be judged a burst.
    const MEANS_NEEDED: usize = 30;

    /// Record a rate sample taken at `at`; a sample in a later minute closes the minute
    /// being gathered. Samples from an earlier minute are ignored.
    pub fn record(&mut self, at: Duration, rate: f64, floor: f64) {
        if !rate.is_finite() {
            return;
        }
        let minute = at.as_secs() / 60;
        match &mut self.current {
            Some((index, peak, sum, count)) if *index == minute => {
                *peak = peak.max(rate);
                *sum += rate;
                *count += 1;
            }
            Some((index, ..)) if *index > minute => {}
            _ => {
                if let Some((index, peak, sum, count)) = self.current.take() {
                    self.close(index, peak, sum / f64::from(count.max(1)), floor);
                }
                self.current = Some((minute, rate, rate, 1));
            }
        }
    }

    fn close(&mut self, minute: u64, peak: f64, mean: f64, floor: f64) {
        if self.means.len() >= Self::MEANS_NEEDED {
            let before = self.means.iter().sum::<f64>() / self.means.len() as f64;
            if peak >= 2.0 * before && peak - before >= floor {
                match self.last_burst {
                    Some(last) if minute - last >= 2 => {
                        self.gaps.push_back(minute - last);
                        if self.gaps.len() > Self::GAPS_KEPT {
                            self.gaps.pop_front();
                        }
                        self.median_gap = (self.gaps.len() >= 3)
                            .then(|| quantile(self.gaps.iter().map(|&gap| gap as f64), 0.5) * 60.0);
                        self.onset(minute, peak);
                    }
                    // The same burst goes on: its peak is the highest of its minutes.
                    Some(_) => {
                        if let Some(onset) = self.onsets.back_mut()
                            && peak > onset.1
                        {
                            onset.1 = peak;
                            self.rhythm = self.find_rhythm();
                        }
                    }
                    None => self.onset(minute, peak),
                }
                self.last_burst = Some(minute);
            }
        }
        self.means.push_back(mean);
        if self.means.len() > Self::HOUR {
            self.means.pop_front();
        }
    }

    /// A burst started at `minute`: keep it and look again for a rhythm.
    fn onset(&mut self, minute: u64, peak: f64) {
        self.onsets.push_back((minute, peak));
        if self.onsets.len() > Self::ONSETS_KEPT {
            self.onsets.pop_front();
        }
        self.rhythm = self.find_rhythm();
    }

    /// The rhythm the kept burst starts keep, if any: for the hour and for the half hour,
    /// the window of [`Self::WINDOW_MINUTES`] that holds the most starts (on a tie, one
    /// that opens on a start, then the earliest); of the two, the one holding more (the
    /// hour on a tie, half as many windows to provision); a rhythm if it holds at least
    /// 60 % of them (by chance 5-10 %).
    fn find_rhythm(&self) -> Option<Rhythm> {
        let starts = self.onsets.len();
        if starts < Self::ONSETS_NEEDED {
            return None;
        }
        let in_window = |period: u64, start: u64, minute: u64| {
            (minute + period - start % period) % period < Self::WINDOW_MINUTES
        };
        let best_window = |period: u64| {
            (0..period)
                .map(|start| {
                    let count = self
                        .onsets
                        .iter()
                        .filter(|&&(minute, _)| in_window(period, start, minute))
                        .count();
                    let opens_on_a_start = self
                        .onsets
                        .iter()
                        .any(|&(minute, _)| minute % period == start);
                    (count, opens_on_a_start, std::cmp::Reverse(start))
                })
                .max()
                .map_or((0, 0), |(count, _, start)| (count, start.0))
        };
        let (count, period, start) = Self::PERIODS_MINUTES
            .into_iter()
            .map(|period| {
                let (count, start) = best_window(period);
                (count, period, start)
            })
            .max_by_key(|&(count, period, _)| (count, period))?;
        if count * 10 < starts * 6 {
            return None;
        }
        let rhythmic = || {
            self.onsets
                .iter()
                .filter(move |&&(minute, _)| in_window(period, start, minute))
        };
        Some(Rhythm {
            period_minutes: period,
            start_minute: start,
            peak: quantile(rhythmic().map(|&(_, peak)| peak), 0.5),
            last_minute: rhythmic().map(|&(minute, _)| minute).max().unwrap_or(0),
        })
    }

    /// The rate a burst is expected to reach if capacity asked for at `now` with start-up
    /// `lead` could meet one: while bursts keep a clock rhythm, from `lead` before its
    /// window until the window ends, the median highest sample of the bursts that started
    /// in it; otherwise none. A rhythm with no burst in its window for 12 hours is no
    /// longer kept to.
    pub fn expected_burst(&self, now: Duration, lead: Duration) -> Option<f64> {
        let rhythm = self
            .rhythm
            .filter(|r| now.as_secs() / 60 <= r.last_minute + Self::RHYTHM_LAPSES_MINUTES)?;
        // In milliseconds: a measured start-up time has a fraction of a second.
        let millis = |duration: Duration| u64::try_from(duration.as_millis()).unwrap_or(u64::MAX);
        let (now, lead) = (millis(now), millis(lead));
        let period = rhythm.period_minutes * 60_000;
        let window = Self::WINDOW_MINUTES * 60_000;
        let ahead =
            now.saturating_add(lead) % period + period - rhythm.start_minute * 60_000 % period;
        (ahead % period < lead.saturating_add(window) || lead.saturating_add(window) >= period)
            .then_some(rhythm.peak)
    }

    /// Whether bursts have been coming back within `within`: at least three gaps seen, and
    /// their median no longer than `within`.
    pub fn return_within(&self, within: Duration) -> bool {
        self.median_gap
            .is_some_and(|median| median <= within.as_secs_f64())
    }
}

/// How far a rate is rising, for capacity that takes a start-up time (the lead) to come:
/// the mean of its newest samples (the last half lead, at least one sample) against the
/// mean of those in the lead before them. A rise that has gone on that long may go on as
/// far again before capacity asked for now is ready. Bounded: keeps the samples of the last
/// lead and a half (or lead and one sample), for the longest lead seen, since a service's
/// measured start-up time varies.
#[derive(Debug, Clone, Default)]
pub struct Rise {
    /// (when, rate), oldest first.
    samples: VecDeque<(Duration, f64)>,
    /// How far back samples are kept: the longest span any call has looked at.
    keep: Duration,
}

impl Rise {
    /// Record `rate`, a sample `sample` long ending at `now`, and return the newest span's
    /// mean plus as much again as it rose above the span before it (nothing added if it
    /// fell), for lead `lead`. `None` while either span holds no sample or does not fit
    /// after time zero, and when a sample is as long as the lead: capacity asked for at one
    /// sample is then ready before the next is seen, and a rise over whole samples would
    /// be counted again over more than the lead.
    pub fn record(
        &mut self,
        now: Duration,
        rate: f64,
        sample: Duration,
        lead: Duration,
    ) -> Option<f64> {
        self.samples.push_back((now, rate));
        let newest = sample.max(lead / 2);
        self.keep = self.keep.max(lead.saturating_add(newest));
        while self
            .samples
            .front()
            .is_some_and(|&(at, _)| now.saturating_sub(at) > self.keep)
        {
            self.samples.pop_front();
        }
        if lead <= sample {
            return None;
        }
        let split = now.checked_sub(newest)?;
        let oldest = split.checked_sub(lead)?;
        // (sum, count) of the newest span and of the lead before it.
        let (mut recent, mut before) = ((0.0, 0u32), (0.0, 0u32));
        for &(at, rate) in &self.samples {
            let span = if at > split {
                &mut recent
            } else if at > oldest {
                &mut before
            } else {
                continue;
            };
            span.0 += rate;
            span.1 += 1;
        }
        let mean = |(sum, count): (f64, u32)| (count > 0).then(|| sum / f64::from(count));
        let (recent, before) = (mean(recent)?, mean(before)?);
        Some(recent + (recent - before).max(0.0))
    }
}

/// The `q` quantile (0..=1) of the values, by nearest rank; 0 for no values.
pub fn quantile(values: impl Iterator<Item = f64>, q: f64) -> f64 {
    let mut sorted: Vec<f64> = values.filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return 0.0;
    }
    sorted.sort_by(f64::total_cmp);
    let rank = ((sorted.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted[rank]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rise_is_counted_again_on_top_of_the_newest_rate() {
        let minute = Duration::from_secs(60);
        let lead = Duration::from_secs(120);
        let mut rise = Rise::default();
        // One sample: nothing before the newest minute to compare with.
        assert_eq!(rise.record(minute, 20.0, minute, lead), None);
        rise.record(minute * 2, 20.0, minute, lead);
        rise.record(minute * 3, 20.0, minute, lead);
        // Newest span one minute (half the lead is no longer): 40; the lead before it,
        // minutes 2 and 3: 20. It rose 20, and may rise 20 more.
        assert_eq!(rise.record(minute * 4, 40.0, minute, lead), Some(60.0));
        // A fall (to 10 from a mean of 30) takes nothing away.
        let mut fell = rise.clone();
        assert_eq!(fell.record(minute * 5, 10.0, minute, lead), Some(10.0));
        // Samples as long as the lead: capacity asked for now is ready before the next.
        assert_eq!(rise.record(minute * 5, 10.0, minute, minute), None);

        // Per-second samples of a ramp (rate = seconds), lead 10 s: the newest 5 s (96-100,
        // mean 98) against the 10 s before them (86-95, mean 90.5).
        let second = Duration::from_secs(1);
        let lead = Duration::from_secs(10);
        let mut ramp = Rise::default();
        let mut last = None;
        for t in 1..=100u64 {
            last = ramp.record(Duration::from_secs(t), t as f64, second, lead);
            // Bounded: 15 s of samples (and the one just past).
            assert!(ramp.samples.len() <= 16, "{}", ramp.samples.len());
        }
        assert_eq!(last, Some(98.0 + 7.5));
        // A step five seconds ago is all in the newest span (96-100), none of it before.
        let mut step = Rise::default();
        for t in 1..=100u64 {
            let rate = if t > 95 { 10.0 } else { 0.0 };
            last = step.record(Duration::from_secs(t), rate, second, lead);
        }
        assert_eq!(last, Some(20.0));
    }

    #[test]
    fn a_rise_is_measured_over_the_whole_lead_when_the_lead_shortened_and_grew_back() {
        // A 20 s lead, then 10 s (the measured start-up time fell), then 20 s again: the
        // samples a 20 s lead needs are still there. Rate = seconds: the newest 10 s
        // (91-100, mean 95.5) against the 20 s before them (71-90, mean 80.5).
        let second = Duration::from_secs(1);
        let mut rise = Rise::default();
        let mut last = None;
        for t in 1..=100u64 {
            let lead = Duration::from_secs(if (50..100).contains(&t) { 10 } else { 20 });
            last = rise.record(Duration::from_secs(t), t as f64, second, lead);
        }
        assert_eq!(last, Some(95.5 + 15.0));
    }

    #[test]
    fn holt_follows_a_ramp() {
        let mut holt = Holt::new(0.5, 0.5);
        for value in 0..50 {
            holt.update(f64::from(value));
        }
        // Level 49, trend 1, damped over 10 steps: 49 + Σ 0.98^i (i = 1..=10) ≈ 49 + 8.9.
        assert!(
            (holt.forecast(10.0) - 57.9).abs() < 0.5,
            "{}",
            holt.forecast(10.0)
        );
    }

    #[test]
    fn seasonal_mean_uses_earlier_periods_only() {
        let mut history = SeasonalHistory::new(Duration::from_secs(60), 10_000);
        // Three "days" of 10 buckets: value = bucket within the day, plus 100 × day.
        for day in 0..3u64 {
            for bucket in 0..10u64 {
                history.record(
                    Duration::from_secs((day * 10 + bucket) * 60),
                    (bucket + 100 * day) as f64,
                );
            }
        }
        // Bucket 4 of day 3 (not yet seen): mean of day 0, 1, 2 at bucket 4.
        assert_eq!(
            history.seasonal_mean(Duration::from_secs((30 + 4) * 60), 10),
            104.0
        );
        assert!((history.days_covered() - 30.0 * 60.0 / 86_400.0).abs() < 1e-9);
    }

    /// A sample every 10 s up to minute `until`: 10/s, and in each of `bursts` (minute,
    /// rate) one sample of that rate.
    fn bursts_at(bursts: &[(u64, f64)], until: u64) -> BurstGaps {
        let mut gaps = BurstGaps::default();
        for s in (0..until * 60).step_by(10) {
            let rate = bursts
                .iter()
                .find(|&&(minute, _)| minute == s / 60 && s % 60 == 30)
                .map_or(10.0, |&(_, rate)| rate);
            gaps.record(Duration::from_secs(s), rate, 5.0);
        }
        gaps
    }

    fn of_100(minutes: &[u64]) -> Vec<(u64, f64)> {
        minutes.iter().map(|&minute| (minute, 100.0)).collect()
    }

    fn at_minute(minute: i64, second: i64) -> Duration {
        Duration::from_secs((minute * 60 + second) as u64)
    }

    #[test]
    fn a_burst_rhythm_is_found_when_bursts_start_at_the_same_minutes_of_the_half_hour() {
        // Nine bursts at 1 or 2 minutes past the half hour (29 to 31 minutes apart) and one
        // at 17 past: the window is minutes 1-3 of every half hour (minutes 0-2 hold as many
        // starts, but none opens it); the hour's best window holds 5 of the 10.
        let clocked = bursts_at(
            &of_100(&[61, 77, 92, 121, 152, 181, 212, 241, 272, 301]),
            331,
        );
        let lead = Duration::from_secs(30);
        assert_eq!(clocked.expected_burst(at_minute(361, -31), lead), None);
        for second in [-30, 0, 100, 179] {
            assert_eq!(
                clocked.expected_burst(at_minute(361, second), lead),
                Some(100.0),
                "{second} s from the window's opening"
            );
        }
        assert_eq!(clocked.expected_burst(at_minute(361, 180), lead), None);
        assert_eq!(
            clocked.expected_burst(at_minute(391, 60), lead),
            Some(100.0)
        );
        // Twelve hours after the last start in the window (minute 301), the rhythm lapses.
        assert_eq!(
            clocked.expected_burst(at_minute(1021, 59), lead),
            Some(100.0)
        );
        assert_eq!(clocked.expected_burst(at_minute(1022, 0), lead), None);
        // Minutes past the half hour 1, 19, 13, 7, 0, 21, 19, 14, 11, 13: no rhythm.
        let irregular = bursts_at(
            &of_100(&[61, 79, 103, 127, 150, 171, 199, 224, 251, 283]),
            331,
        );
        for second in (0..3600).step_by(10) {
            assert_eq!(irregular.expected_burst(at_minute(331, second), lead), None);
        }
        // Seven clocked starts are too few to call a rhythm.
        let few = bursts_at(&of_100(&[61, 92, 121, 152, 181, 212, 241]), 331);
        assert_eq!(few.expected_burst(at_minute(361, 0), lead), None);
    }

    #[test]
    fn an_hourly_rhythm_may_straddle_the_hour_and_expects_a_bursts_highest_minute() {
        // Eight two-minute bursts, at 59 past the hour (100/s) and on the hour (150/s): they
        // start at 59 past every hour, which is also 29 past every half hour; the hour wins
        // the tie. The window is minutes 59, 0 and 1; with a 2-minute start-up, capacity
        // for 150/s is asked from 57 past until 2 past.
        let bursts: Vec<(u64, f64)> = (1..=8)
            .flat_map(|hour| [(hour * 60 + 59, 100.0), (hour * 60 + 60, 150.0)])
            .collect();
        let hourly = bursts_at(&bursts, 600);
        let lead = Duration::from_secs(120);
        assert_eq!(hourly.expected_burst(at_minute(657, -1), lead), None);
        assert_eq!(hourly.expected_burst(at_minute(657, 0), lead), Some(150.0));
        assert_eq!(hourly.expected_burst(at_minute(661, 59), lead), Some(150.0));
        assert_eq!(hourly.expected_burst(at_minute(662, 0), lead), None);
        assert_eq!(hourly.expected_burst(at_minute(687, 0), lead), None);
        // A start-up longer than the hour less the window: always.
        assert_eq!(
            hourly.expected_burst(at_minute(630, 0), Duration::from_secs(58 * 60)),
            Some(150.0)
        );
    }

    #[test]
    fn burst_gaps_are_minutes_between_bursts() {
        let mut bursts = BurstGaps::default();
        // A sample every 10 s: 10/s for 40 minutes, then minutes at 100/s (one second of
        // it suffices) at minutes 40, 41 (the same burst), 45, 52 and 60.
        for s in (0..62 * 60).step_by(10) {
            let minute = s / 60;
            let burst = [40, 41, 45, 52, 60].contains(&minute) && s % 60 == 30;
            bursts.record(
                Duration::from_secs(s),
                if burst { 100.0 } else { 10.0 },
                5.0,
            );
        }
        assert_eq!(Vec::from(bursts.gaps.clone()), vec![4, 7, 8]);
        assert!(bursts.return_within(Duration::from_secs(7 * 60)));
        assert!(!bursts.return_within(Duration::from_secs(6 * 60)));
        // Not a burst: less than `floor` above the hour's mean, however many times it is.
        let mut quiet = BurstGaps::default();
        for s in (0..62 * 60).step_by(10) {
            let rate = if s % 300 == 0 && s > 40 * 60 {
                0.3
            } else {
                0.1
            };
            quiet.record(Duration::from_secs(s), rate, 1.0);
        }
        assert!(quiet.gaps.is_empty());
    }

    #[test]
    fn quantiles_by_rank() {
        assert_eq!(quantile([3.0, 1.0, 2.0].into_iter(), 0.5), 2.0);
        assert_eq!(quantile([3.0, 1.0, 2.0].into_iter(), 1.0), 3.0);
        assert_eq!(quantile(std::iter::empty(), 0.9), 0.0);
    }

    /// A daily sine around 100 with amplitude 50, by minute.
    fn daily_sine(minute: u64) -> f64 {
        100.0 + 50.0 * (minute as f64 / 1440.0 * std::f64::consts::TAU).sin()
    }

    #[test]
    fn recent_means_group_complete_buckets_and_carry_gaps() {
        let mut history = SeasonalHistory::new(Duration::from_secs(60), 100);
        // Minutes 0..=11 hold their own number, except 7 (nothing recorded).
        for minute in (0..=11u64).filter(|m| *m != 7) {
            history.record(Duration::from_secs(minute * 60 + 1), minute as f64);
        }
        // At minute 11 (incomplete): groups of 5 complete minutes are [0, 5) and [5, 10);
        // minute 7 carries minute 6's value.
        let (means, end) = history.recent_means(Duration::from_secs(11 * 60 + 30), 5, 10);
        assert_eq!(means, vec![2.0, (5.0 + 6.0 + 6.0 + 8.0 + 9.0) / 5.0]);
        assert_eq!(end, Duration::from_secs(600));
        // At most `groups`, the newest kept.
        let (means, _) = history.recent_means(Duration::from_secs(11 * 60 + 30), 5, 1);
        assert_eq!(means.len(), 1);
        assert_eq!(means[0], 6.8);
    }

    #[test]
    fn mstl_forecasts_a_daily_season() {
        let mut history = SeasonalHistory::new(Duration::from_secs(60), 14 * 1440);
        let minutes = 3 * 1440 + 37;
        for minute in 0..minutes {
            history.record(Duration::from_secs(minute * 60 + 5), daily_sine(minute));
        }
        let now = Duration::from_secs(minutes * 60);
        let (series, end) = history.recent_means(now, 5, 4 * 288);
        let model =
            ModelForecast::fit(&series, Duration::from_secs(300), end, 20).expect("three days fit");
        assert_eq!(model.kind, ModelKind::Mstl);
        for ahead in [0, 60, 600, 1800] {
            let at = now + Duration::from_secs(ahead);
            let forecast = model.at(at).expect("within the path");
            let truth = daily_sine(at.as_secs() / 60);
            assert!(
                (forecast - truth).abs() < 1.0,
                "+{ahead}s: {forecast} vs {truth}"
            );
        }
        // Past the path's end there is no forecast.
        assert_eq!(model.at(end + Duration::from_secs(300 * 21)), None);
        assert_eq!(model.at(end - Duration::from_secs(1)), None);
    }

    #[test]
    fn ets_forecasts_a_series_without_a_daily_season() {
        // Two hours of 5-minute means alternating 50, 51, 52: no day to find a season in.
        let series: Vec<f64> = (0..24).map(|i| 50.0 + f64::from(i % 3)).collect();
        let model = ModelForecast::fit(&series, Duration::from_secs(300), Duration::ZERO, 12)
            .expect("two hours fit");
        assert_eq!(model.kind, ModelKind::Ets);
        assert!(
            model.path.iter().all(|v| (50.0..=52.0).contains(v)),
            "{:?}",
            model.path
        );
        // Too short a series, or one with a gap, gives no model.
        assert!(
            ModelForecast::fit(&series[..10], Duration::from_secs(300), Duration::ZERO, 12)
                .is_none()
        );
        let mut gap = series.clone();
        gap[3] = f64::NAN;
        assert!(ModelForecast::fit(&gap, Duration::from_secs(300), Duration::ZERO, 12).is_none());
    }
}
