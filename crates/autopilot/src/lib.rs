//! Scaling decisions, without I/O.
//!
//! This crate owns the question "how many instances should this service have right now?".
//! It never reads a clock, touches the network or the disk, or spawns anything: every input,
//! including `now`, arrives as a value in an [`Observation`], and the answer is a plain
//! number. That keeps every policy deterministic, so the live platform and the trace-driven
//! simulator can run exactly the same code.

use std::time::Duration;

pub mod anomaly;
pub mod evaluate;
pub mod forecast;
pub mod history;
pub mod policies;
pub mod sim;
pub mod traces;

/// What a policy sees of one service at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observation {
    /// Monotonic time since an arbitrary origin fixed for the life of the service.
    pub now: Duration,
    /// Requests currently executing in an instance.
    pub in_flight: u32,
    /// Requests admitted and waiting for a free instance.
    pub queued: u32,
    /// Instances that are still starting and cannot serve yet.
    pub starting: u32,
    /// Ready instances, each with the moment it last finished (or started) work.
    pub ready: Vec<InstanceActivity>,
    /// Requests that have arrived since the service started (admitted or not): demand, the
    /// signal forecasting policies learn from. Rates are differences of this count.
    pub arrivals_total: u64,
    /// How long the most recent instance took to become ready, once measured: the lead
    /// time a forecasting policy must look ahead.
    pub startup_last: Option<Duration>,
}

/// Activity of one ready instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InstanceActivity {
    /// Requests this instance is executing now.
    pub busy: u32,
    /// When the instance last became idle (or became ready, if it never served).
    pub idle_since: Duration,
}

/// Per-service bounds and shape that every policy must respect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalingBounds {
    pub instances_min: u32,
    pub instances_max: u32,
    /// Requests one instance serves at once; at least 1.
    pub concurrency: u32,
    /// An instance idle for this long may be stopped.
    pub idle_timeout: Duration,
}

/// A scaling policy: observations in, desired instance count out.
///
/// Implementations must be deterministic functions of their inputs and their own state; the
/// result must lie within the bounds: every policy here clamps it with [`clamp_desired`].
pub trait Policy: Send {
    /// The number of instances (ready plus starting) the service should have.
    fn desired(&mut self, bounds: &ScalingBounds, observation: &Observation) -> u32;

    /// The arrival rate (requests per second) the policy expects one start-up lead ahead,
    /// if it forecasts at all.
    fn forecast(&self) -> Option<f64> {
        None
    }

    /// Which of its forecasters made that forecast (a forecasting policy with several).
    fn forecaster(&self) -> Option<&'static str> {
        None
    }

    /// Arrival rates (requests per second, one-minute means) seen before the policy's first
    /// observation, oldest first, at their times on the policy's clock: a service's history
    /// outlives restarts and revisions, and a forecasting policy starts from it instead of
    /// from nothing. Others ignore it.
    fn learn(&mut self, _past: &[(Duration, f64)]) {}
}

/// Calls a policy at most once per `period` (policies with time windows are built for
/// regular observations, and the platform observes irregularly, on every wake-up), and in
/// between returns its last answer, raised at once if work is waiting with no capacity at
/// all, so a scale from zero never waits for the next period.
pub struct Paced<P> {
    pub inner: P,
    pub period: Duration,
    last: Option<(Duration, u32)>,
}

impl<P: Policy> Paced<P> {
    pub fn new(inner: P, period: Duration) -> Self {
        Paced {
            inner,
            period,
            last: None,
        }
    }
}

impl<P: Policy> Policy for Paced<P> {
    fn desired(&mut self, bounds: &ScalingBounds, observation: &Observation) -> u32 {
        let answer = match self.last {
            Some((at, answer)) if observation.now < at + self.period => answer,
            _ => {
                let answer = self.inner.desired(bounds, observation);
                self.last = Some((observation.now, answer));
                answer
            }
        };
        let no_capacity = observation.ready.is_empty() && observation.starting == 0;
        let waiting = observation.queued + observation.in_flight;
        if no_capacity && waiting > 0 {
            return clamp_desired(
                bounds,
                answer.max(waiting.div_ceil(bounds.concurrency.max(1))),
            );
        }
        answer
    }

    fn forecast(&self) -> Option<f64> {
        self.inner.forecast()
    }

    fn forecaster(&self) -> Option<&'static str> {
        self.inner.forecaster()
    }

    fn learn(&mut self, past: &[(Duration, f64)]) {
        self.inner.learn(past);
    }
}

/// Clamp a policy's answer to the service's bounds.
pub fn clamp_desired(bounds: &ScalingBounds, desired: u32) -> u32 {
    desired.clamp(
        bounds.instances_min,
        bounds.instances_max.max(bounds.instances_min),
    )
}

/// The reactive baseline: start instances as soon as admitted work exceeds capacity, stop
/// instances only after they have been idle for the service's `idle_timeout`.
///
/// Scale-up is immediate and exact (one instance per `concurrency` requests waiting or
/// running), because a request queued behind a starting instance is latency the user sees.
/// Scale-down is lazy: an instance that served anything within `idle_timeout` is kept, which
/// absorbs bursty traffic without flapping.
#[derive(Debug, Default, Clone)]
pub struct Reactive;

impl Policy for Reactive {
    fn desired(&mut self, bounds: &ScalingBounds, observation: &Observation) -> u32 {
        let concurrency = bounds.concurrency.max(1);
        let work = observation.in_flight + observation.queued;
        let needed_for_work = work.div_ceil(concurrency);
        let recently_active = observation
            .ready
            .iter()
            .filter(|instance| {
                instance.busy > 0
                    || observation.now.saturating_sub(instance.idle_since) < bounds.idle_timeout
            })
            .count() as u32;
        // Starting instances are already paid for and will be needed by whatever made us
        // start them; never cancel them from here.
        let keep = recently_active + observation.starting;
        clamp_desired(bounds, needed_for_work.max(keep))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use expect_test::{Expect, expect};

    fn bounds() -> ScalingBounds {
        ScalingBounds {
            instances_min: 0,
            instances_max: 5,
            concurrency: 1,
            idle_timeout: Duration::from_secs(30),
        }
    }

    /// `ready` is a list of (busy, idle_since_secs).
    fn check(
        bounds: ScalingBounds,
        now_s: u64,
        in_flight: u32,
        queued: u32,
        starting: u32,
        ready: &[(u32, u64)],
        expect: Expect,
    ) {
        let observation = Observation {
            now: Duration::from_secs(now_s),
            in_flight,
            queued,
            starting,
            ready: ready
                .iter()
                .map(|&(busy, idle_since)| InstanceActivity {
                    busy,
                    idle_since: Duration::from_secs(idle_since),
                })
                .collect(),
            arrivals_total: 0,
            startup_last: None,
        };
        let desired = Reactive.desired(&bounds, &observation);
        expect.assert_eq(&desired.to_string());
    }

    #[test]
    fn scales_from_zero_on_first_request() {
        check(bounds(), 100, 0, 1, 0, &[], expect!["1"]);
    }

    #[test]
    fn burst_is_capped_at_max() {
        check(bounds(), 100, 0, 50, 0, &[], expect!["5"]);
    }

    #[test]
    fn concurrency_divides_work() {
        let bounds = ScalingBounds {
            concurrency: 4,
            ..bounds()
        };
        check(bounds, 100, 3, 6, 0, &[(3, 0)], expect!["3"]);
    }

    #[test]
    fn keeps_recently_idle_instances() {
        check(bounds(), 100, 0, 0, 0, &[(0, 80), (0, 71)], expect!["2"]);
    }

    #[test]
    fn stops_instances_idle_past_timeout() {
        check(
            bounds(),
            100,
            0,
            0,
            0,
            &[(0, 80), (0, 70), (0, 10)],
            expect!["1"],
        );
    }

    #[test]
    fn scales_to_zero_when_all_idle() {
        check(bounds(), 100, 0, 0, 0, &[(0, 10), (0, 20)], expect!["0"]);
    }

    #[test]
    fn min_is_respected() {
        let bounds = ScalingBounds {
            instances_min: 2,
            ..bounds()
        };
        check(bounds, 100, 0, 0, 0, &[(0, 10)], expect!["2"]);
    }

    #[test]
    fn starting_instances_are_not_cancelled() {
        check(bounds(), 100, 0, 0, 2, &[], expect!["2"]);
    }

    #[test]
    fn busy_instance_is_kept_even_if_idle_since_is_old() {
        check(bounds(), 100, 1, 0, 0, &[(1, 0)], expect!["1"]);
    }

    #[test]
    fn paced_asks_the_inner_policy_once_per_period_but_never_delays_a_cold_start() {
        struct Counting(u32);
        impl Policy for Counting {
            fn desired(&mut self, _: &ScalingBounds, _: &Observation) -> u32 {
                self.0 += 1;
                0
            }
        }
        let mut paced = Paced::new(Counting(0), Duration::from_secs(1));
        let at = |ms: u64, queued: u32| Observation {
            now: Duration::from_millis(ms),
            queued,
            ..Observation::default()
        };
        for ms in [0, 200, 400, 999] {
            assert_eq!(paced.desired(&bounds(), &at(ms, 0)), 0);
        }
        assert_eq!(paced.inner.0, 1, "one call within the first second");
        // Work arrives with nothing running: answered at once, between periods.
        assert_eq!(paced.desired(&bounds(), &at(1100, 3)), 3);
        assert_eq!(paced.inner.0, 2);
        assert_eq!(
            paced.desired(&bounds(), &at(1500, 3)),
            3,
            "still between periods, still guarded"
        );
        assert_eq!(paced.inner.0, 2);
    }
}
