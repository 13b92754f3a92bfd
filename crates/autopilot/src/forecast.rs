//! Forecasting building blocks, all plain arithmetic on values handed in.

use std::collections::VecDeque;
use std::time::Duration;

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

    #[test]
    fn quantiles_by_rank() {
        assert_eq!(quantile([3.0, 1.0, 2.0].into_iter(), 0.5), 2.0);
        assert_eq!(quantile([3.0, 1.0, 2.0].into_iter(), 1.0), 3.0);
        assert_eq!(quantile(std::iter::empty(), 0.9), 0.0);
    }
}
