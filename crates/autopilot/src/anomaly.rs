//! Anomaly detection on a service's signals (traffic, latency, error rate), one value per
//! second, without I/O.
//!
//! Each signal is judged against what was expected: a forecast when one is given (the
//! scaling policy's, for traffic), else the signal's own recent baseline (an exponentially
//! weighted mean and variance). A value further than `k` standard deviations from the
//! expectation for `persist` seconds in a row is an anomaly, reported once; the detector
//! re-arms when the signal is back within bounds.

/// What was unusual about a value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Anomaly {
    pub value: f64,
    pub expected: f64,
    /// Standard deviation the judgement used.
    pub sigma: f64,
    /// True when the value is above what was expected.
    pub high: bool,
}

#[derive(Debug, Clone)]
pub struct Detector {
    alpha: f64,
    k: f64,
    persist: u32,
    /// Deviations smaller than this are never anomalies (absolute units of the signal).
    floor: f64,
    mean: f64,
    variance: f64,
    seen: u32,
    /// Values seen before anything is judged.
    warm_up: u32,
    streak: u32,
    reported: bool,
}

/// Seconds of history before a detector judges anything, by default.
pub const WARM_UP_DEFAULT: u32 = 60;

impl Detector {
    /// `floor`: the smallest deviation worth reporting, in the signal's units.
    pub fn new(floor: f64) -> Self {
        Self::with_warm_up(floor, WARM_UP_DEFAULT)
    }

    /// Like [`Detector::new`], judging only after `warm_up` values (at least 10, so the
    /// baseline has a variance).
    pub fn with_warm_up(floor: f64, warm_up: u32) -> Self {
        Detector {
            warm_up: warm_up.max(10),
            alpha: 0.02,
            k: 4.0,
            persist: 3,
            floor,
            mean: 0.0,
            variance: 0.0,
            seen: 0,
            streak: 0,
            reported: false,
        }
    }

    /// Feed one second's value, with a forecast if there is one; returns an anomaly the
    /// first second it is established.
    pub fn observe(&mut self, value: f64, forecast: Option<f64>) -> Option<Anomaly> {
        if !value.is_finite() {
            return None;
        }
        let expected = forecast.filter(|f| f.is_finite()).unwrap_or(self.mean);
        let sigma = self.variance.sqrt().max(self.floor);
        let deviation = value - expected;
        let unusual = self.seen >= self.warm_up && deviation.abs() > self.k * sigma;
        // Unusual values move the baseline slowly, so a lasting shift becomes the new normal.
        let alpha = if unusual {
            self.alpha / 10.0
        } else {
            self.alpha
        };
        if self.seen == 0 {
            self.mean = value;
        } else {
            let delta = value - self.mean;
            self.mean += alpha * delta;
            self.variance = (1.0 - alpha) * (self.variance + alpha * delta * delta);
        }
        self.seen = self.seen.saturating_add(1);
        if !unusual {
            self.streak = 0;
            self.reported = false;
            return None;
        }
        self.streak += 1;
        if self.streak >= self.persist && !self.reported {
            self.reported = true;
            return Some(Anomaly {
                value,
                expected,
                sigma,
                high: deviation > 0.0,
            });
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noisy(i: u32) -> f64 {
        100.0 + f64::from(i % 7) - 3.0
    }

    #[test]
    fn a_shorter_warm_up_judges_sooner_and_not_before() {
        let mut detector = Detector::with_warm_up(1.0, 20);
        for i in 0..20 {
            assert_eq!(detector.observe(noisy(i), None), None);
        }
        for _ in 0..2 {
            assert_eq!(
                detector.observe(300.0, None),
                None,
                "still within persistence"
            );
        }
        assert!(
            detector.observe(300.0, None).is_some(),
            "judged after 20 values"
        );
        let mut early = Detector::with_warm_up(1.0, 20);
        for i in 0..10 {
            assert_eq!(early.observe(noisy(i), None), None);
        }
        for _ in 0..5 {
            assert_eq!(early.observe(300.0, None), None, "before the warm-up ends");
        }
    }

    #[test]
    fn a_lasting_spike_is_reported_once_and_re_arms() {
        let mut detector = Detector::new(1.0);
        for i in 0..120 {
            assert_eq!(
                detector.observe(noisy(i), None),
                None,
                "steady noise at {i}"
            );
        }
        assert_eq!(
            detector.observe(300.0, None),
            None,
            "one second is not yet an anomaly"
        );
        assert_eq!(detector.observe(300.0, None), None);
        let anomaly = detector
            .observe(300.0, None)
            .expect("three seconds in a row are");
        assert!(
            anomaly.high && (anomaly.expected - 100.0).abs() < 5.0,
            "{anomaly:?}"
        );
        assert_eq!(detector.observe(300.0, None), None, "reported once");
        for i in 0..5 {
            detector.observe(noisy(i), None);
        }
        for _ in 0..2 {
            assert_eq!(detector.observe(0.0, None), None);
        }
        assert!(
            detector.observe(0.0, None).is_some_and(|a| !a.high),
            "a drop is reported too"
        );
    }

    #[test]
    fn a_forecast_sets_the_expectation() {
        let mut detector = Detector::new(1.0);
        for i in 0..120 {
            detector.observe(noisy(i), Some(noisy(i)));
        }
        // The forecast said 300 and 300 came: nothing unusual, however far from the past.
        for _ in 0..5 {
            assert_eq!(detector.observe(300.0, Some(300.0)), None);
        }
    }

    #[test]
    fn nothing_is_judged_before_the_warm_up() {
        let mut detector = Detector::new(1.0);
        for value in [1.0, 1000.0, 1.0, 1000.0, 5000.0, 5000.0, 5000.0] {
            assert_eq!(detector.observe(value, None), None);
        }
    }
}
