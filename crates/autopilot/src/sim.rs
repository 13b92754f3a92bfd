//! The trace-driven simulator: runs a [`Policy`] against a demand trace, in time steps, and
//! measures availability, latency and cost. Deterministic: the same inputs give the same
//! result, bit for bit (there is no randomness in the model).
//!
//! Model, per step of `step` seconds:
//! - arrivals are `rate × step` requests (fractional: a fluid model), queued FIFO;
//! - each ready instance completes `concurrency / service_time` requests per second;
//! - a request served `k` steps after the step it arrived in has latency
//!   `k × step + service_time`; it is within the SLO if that is at most `slo`;
//! - a request still waiting after `timeout` is dropped (a failure);
//! - an instance asked for at the end of a step is ready `startup` later (serving for the rest
//!   of the step it becomes ready in), and costs from the moment it is asked for; only idle
//!   ready instances are stopped (never busy or starting ones);
//! - the policy sees observations `metric_delay` old;
//! - energy is a linear power model per instance: `idle_watts` when idle, `busy_watts` when
//!   fully busy, linear in between; starting instances draw `busy_watts`.

use std::collections::VecDeque;
use std::time::Duration;

use crate::{InstanceActivity, Observation, Policy, ScalingBounds};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerModel {
    pub idle_watts: f64,
    pub busy_watts: f64,
}

impl Default for PowerModel {
    /// A share of a server per instance: the figures are per instance, for comparison only.
    fn default() -> Self {
        PowerModel {
            idle_watts: 10.0,
            busy_watts: 25.0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SimConfig {
    pub step: Duration,
    pub startup: Duration,
    pub service_time: Duration,
    pub slo: Duration,
    pub timeout: Duration,
    pub metric_delay: Duration,
    pub bounds: ScalingBounds,
    pub power: PowerModel,
    /// Points kept for plotting (the series is downsampled to at most this many).
    pub series_points: usize,
    /// Steps before this one run (policies learn from them) but are not measured.
    pub measure_from: usize,
}

impl SimConfig {
    /// Requests per second one instance completes.
    pub fn per_instance_rate(&self) -> f64 {
        f64::from(self.bounds.concurrency.max(1)) / self.service_time.as_secs_f64().max(1e-6)
    }
}

/// One plotted point: averages over the steps it stands for.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SeriesPoint {
    pub seconds: f64,
    /// Demand, requests per second.
    pub demand: f64,
    /// Demand expressed as instances needed at full utilisation.
    pub demand_instances: f64,
    pub ready: f64,
    pub provisioned: f64,
    /// For a policy that forecasts: the rate it forecast for these steps, one start-up time
    /// and one step before, as instances needed at full utilisation (averaged over the steps
    /// that had one).
    pub forecast_instances: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SimResult {
    pub requests: f64,
    pub within_slo: f64,
    pub dropped: f64,
    /// Requests served within the SLO ÷ all requests.
    pub availability: f64,
    pub latency_p99: Duration,
    pub instance_seconds: f64,
    pub cold_starts: u64,
    pub scale_events: u64,
    pub energy_kwh: f64,
    pub series: Vec<SeriesPoint>,
}

struct SimInstance {
    ready_at: f64,
    idle_since: f64,
}

/// Latency histogram in steps waited (0 = served in the step it arrived).
struct Waits(Vec<f64>);

impl Waits {
    fn add(&mut self, steps: usize, amount: f64) {
        if self.0.len() <= steps {
            self.0.resize(steps + 1, 0.0);
        }
        self.0[steps] += amount;
    }

    fn quantile_steps(&self, q: f64) -> usize {
        let total: f64 = self.0.iter().sum();
        let mut seen = 0.0;
        for (steps, amount) in self.0.iter().enumerate() {
            seen += amount;
            if seen >= total * q - 1e-9 {
                return steps;
            }
        }
        self.0.len().saturating_sub(1)
    }
}

/// Run `policy` over `rates` (requests per second, one value per step).
/// `progress` is called with (steps done, steps total) now and then.
pub fn simulate(
    rates: &[f64],
    config: &SimConfig,
    policy: &mut dyn Policy,
    progress: &mut dyn FnMut(usize, usize),
) -> SimResult {
    let dt = config.step.as_secs_f64();
    let service = config.service_time.as_secs_f64();
    let per_instance = config.per_instance_rate();
    let concurrency = f64::from(config.bounds.concurrency.max(1));
    let startup = config.startup.as_secs_f64();
    let delay_steps = (config.metric_delay.as_secs_f64() / dt).round() as usize;
    let timeout_steps = (config.timeout.as_secs_f64() / dt).floor() as usize;
    // Served after waiting `k` whole steps: latency k·dt + service.
    let slo_steps = ((config.slo.as_secs_f64() - service) / dt).floor();

    let mut instances: Vec<SimInstance> = Vec::new();
    let mut queue: VecDeque<(usize, f64)> = VecDeque::new();
    let mut waits = Waits(Vec::new());
    let mut observations: VecDeque<Observation> = VecDeque::new();
    let mut result = SimResult::default();
    let mut arrivals_total = 0.0;
    let series_every = (rates.len() / config.series_points.max(1)).max(1);
    let mut bucket = SeriesPoint::default();
    let mut bucket_steps = 0usize;
    // Forecasts waiting for the step they are for: (step, rate).
    let forecast_steps = ((startup + dt) / dt).round().max(1.0) as usize;
    let mut forecasts: VecDeque<(usize, f64)> = VecDeque::new();
    let (mut forecast_sum, mut forecast_count) = (0.0, 0u32);
    let mut activity = Vec::new();
    // Observations carry whole counts; the fractions left over are carried to the next step
    // (error diffusion), so the counts are right on average and still deterministic.
    let mut in_flight_carry = 0.0;

    // Every policy starts in its own steady state: what it asks for before any traffic is
    // there at time zero.
    let start = Observation::default();
    for _ in 0..policy.desired(&config.bounds, &start) {
        instances.push(SimInstance {
            ready_at: 0.0,
            idle_since: 0.0,
        });
    }

    for (k, &rate) in rates.iter().enumerate() {
        let t = k as f64 * dt;
        if k % 65_536 == 0 {
            progress(k, rates.len());
        }
        let measured = k >= config.measure_from;
        let arrivals = rate.max(0.0) * dt;
        arrivals_total += arrivals;
        if measured {
            result.requests += arrivals;
        }
        if arrivals > 0.0 {
            queue.push_back((k, arrivals));
        }
        // Drop what waited past the timeout.
        while let Some(&(arrived, amount)) = queue.front() {
            if k - arrived > timeout_steps {
                if arrived >= config.measure_from {
                    result.dropped += amount;
                }
                queue.pop_front();
            } else {
                break;
            }
        }
        let ready = instances.iter().filter(|i| i.ready_at <= t).count();
        // An instance that becomes ready during the step serves for the rest of it; with
        // long steps (per-minute traces) this matters.
        let ready_seconds: f64 = instances
            .iter()
            .map(|i| (t + dt - i.ready_at).clamp(0.0, dt))
            .sum();
        let mut capacity = ready_seconds * per_instance;
        let full_capacity = capacity;
        let mut served = 0.0;
        while capacity > 1e-12 {
            let Some(front) = queue.front_mut() else {
                break;
            };
            let take = front.1.min(capacity);
            let waited = k - front.0;
            if front.0 >= config.measure_from {
                waits.add(waited, take);
                if (waited as f64) <= slo_steps {
                    result.within_slo += take;
                }
            }
            served += take;
            capacity -= take;
            front.1 -= take;
            if front.1 <= 1e-12 {
                queue.pop_front();
            }
        }
        let queued: f64 = queue.iter().map(|(_, a)| a).sum();
        let utilisation = if full_capacity > 0.0 {
            served / full_capacity
        } else {
            0.0
        };
        let in_flight = (served / dt * service).min(ready as f64 * concurrency);

        // Which ready instances are busy: work packs onto the first ones.
        let busy_instances = (in_flight / concurrency).ceil() as usize;
        activity.clear();
        let mut seen_ready = 0usize;
        for instance in instances.iter_mut() {
            if instance.ready_at > t {
                continue;
            }
            let busy = seen_ready < busy_instances;
            seen_ready += 1;
            if busy {
                instance.idle_since = t + dt;
            } else if instance.idle_since < instance.ready_at {
                instance.idle_since = instance.ready_at;
            }
            activity.push(InstanceActivity {
                busy: u32::from(busy),
                idle_since: Duration::from_secs_f64(instance.idle_since),
            });
        }
        let starting = instances.len() - ready;
        let in_flight_whole = (in_flight + in_flight_carry).floor().max(0.0);
        in_flight_carry += in_flight - in_flight_whole;
        observations.push_back(Observation {
            now: Duration::from_secs_f64(t + dt),
            in_flight: in_flight_whole as u32,
            queued: queued.ceil() as u32,
            starting: starting as u32,
            ready: activity.clone(),
            arrivals_total: arrivals_total as u64,
            startup_last: Some(config.startup),
        });
        let observed = if observations.len() > delay_steps {
            observations
                .pop_front()
                .expect("the queue is longer than the delay")
        } else {
            observations.front().cloned().expect("just pushed")
        };
        // The policy decides with the clock of now but the measurements of then.
        let observation = Observation {
            now: Duration::from_secs_f64(t + dt),
            ..observed
        };

        // Cost and energy of this step.
        if measured {
            result.instance_seconds += instances.len() as f64 * dt;
            let watts = ready as f64
                * (config.power.idle_watts
                    + (config.power.busy_watts - config.power.idle_watts) * utilisation)
                + starting as f64 * config.power.busy_watts;
            result.energy_kwh += watts * dt / 3_600_000.0;
        }

        let desired = policy.desired(&config.bounds, &observation) as usize;
        if let Some(forecast) = policy.forecast() {
            forecasts.push_back((k + forecast_steps, forecast));
        }
        let current = instances.len();
        if desired > current {
            if measured && ready == 0 && queued > 0.0 {
                result.cold_starts += 1;
            }
            result.scale_events += u64::from(measured);
            for _ in current..desired {
                instances.push(SimInstance {
                    ready_at: t + dt + startup,
                    idle_since: t + dt + startup,
                });
            }
        } else if desired < current {
            // Stop idle ready instances, longest idle first; busy and starting ones stay.
            let mut idle: Vec<(usize, f64)> = instances
                .iter()
                .enumerate()
                .skip(busy_instances.min(instances.len()))
                .filter(|(_, i)| i.ready_at <= t && i.idle_since <= t)
                .map(|(index, i)| (index, i.idle_since))
                .collect();
            idle.sort_by(|a, b| a.1.total_cmp(&b.1));
            let mut remove: Vec<usize> = idle
                .into_iter()
                .take(current - desired)
                .map(|(index, _)| index)
                .collect();
            if !remove.is_empty() {
                result.scale_events += u64::from(measured);
                remove.sort_unstable();
                for index in remove.into_iter().rev() {
                    instances.remove(index);
                }
            }
        }

        bucket.seconds += t;
        bucket.demand += rate;
        bucket.ready += ready as f64;
        bucket.provisioned += instances.len() as f64;
        while forecasts.front().is_some_and(|&(due, _)| due < k) {
            forecasts.pop_front();
        }
        if let Some(&(due, forecast)) = forecasts.front()
            && due == k
        {
            forecast_sum += forecast;
            forecast_count += 1;
        }
        bucket_steps += 1;
        if bucket_steps == series_every || k + 1 == rates.len() {
            let n = bucket_steps as f64;
            result.series.push(SeriesPoint {
                seconds: bucket.seconds / n,
                demand: bucket.demand / n,
                demand_instances: bucket.demand / n / per_instance,
                ready: bucket.ready / n,
                provisioned: bucket.provisioned / n,
                forecast_instances: (forecast_count > 0)
                    .then(|| forecast_sum / f64::from(forecast_count) / per_instance),
            });
            bucket = SeriesPoint::default();
            bucket_steps = 0;
            (forecast_sum, forecast_count) = (0.0, 0);
        }
    }
    // What is still queued at the end was not served within the SLO either way.
    // Both are sums of fractional requests; rounding can put their ratio a hair above 1.
    result.availability = if result.requests > 0.0 {
        (result.within_slo / result.requests).min(1.0)
    } else {
        1.0
    };
    let p99_steps = waits.quantile_steps(0.99);
    result.latency_p99 = Duration::from_secs_f64(p99_steps as f64 * dt + service);
    progress(rates.len(), rates.len());
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policies::Static;

    fn config(startup_s: u64) -> SimConfig {
        SimConfig {
            step: Duration::from_secs(1),
            startup: Duration::from_secs(startup_s),
            service_time: Duration::from_millis(100),
            slo: Duration::from_secs(2),
            timeout: Duration::from_secs(10),
            metric_delay: Duration::ZERO,
            bounds: ScalingBounds {
                instances_min: 0,
                instances_max: 100,
                concurrency: 1,
                idle_timeout: Duration::from_secs(30),
            },
            power: PowerModel::default(),
            series_points: 10,
            measure_from: 0,
        }
    }

    /// Forecasts, at each decision, exactly the rate one start-up time and one step ahead.
    struct Foresight {
        rates: Vec<f64>,
        steps_ahead: usize,
        last: Option<f64>,
    }

    impl Policy for Foresight {
        fn desired(&mut self, _bounds: &ScalingBounds, observation: &Observation) -> u32 {
            // Decided at the end of step k, whose observation is stamped (k + 1) s (and once
            // before the first step, at 0 s).
            let Some(k) = (observation.now.as_secs() as usize).checked_sub(1) else {
                return 5;
            };
            self.last = self.rates.get(k + self.steps_ahead).copied();
            5
        }

        fn forecast(&self) -> Option<f64> {
            self.last
        }
    }

    #[test]
    fn a_forecast_is_plotted_at_the_time_it_is_for() {
        // A ramp, 3 s start-up in 1 s steps: what was forecast 4 steps ahead lines up with
        // the demand of the step it was for, and the first 4 steps have none.
        let rates: Vec<f64> = (0..40).map(|k| 10.0 * k as f64).collect();
        let config = SimConfig {
            series_points: 40,
            ..config(3)
        };
        let mut policy = Foresight {
            rates: rates.clone(),
            steps_ahead: 4,
            last: None,
        };
        let result = simulate(&rates, &config, &mut policy, &mut |_, _| {});
        assert_eq!(result.series.len(), 40);
        for (k, point) in result.series.iter().enumerate() {
            if k < 4 {
                assert_eq!(point.forecast_instances, None, "step {k}");
            } else {
                assert_eq!(
                    point.forecast_instances,
                    Some(point.demand_instances),
                    "step {k}"
                );
            }
        }
        let none = simulate(
            &rates,
            &config,
            &mut Static { instances: 5 },
            &mut |_, _| {},
        );
        assert!(none.series.iter().all(|p| p.forecast_instances.is_none()));
    }

    #[test]
    fn enough_static_capacity_serves_everything_within_the_slo() {
        // 10 req/s per instance; 50 req/s needs 5.
        let rates = vec![50.0; 100];
        let result = simulate(
            &rates,
            &config(0),
            &mut Static { instances: 5 },
            &mut |_, _| {},
        );
        assert!((result.availability - 1.0).abs() < 1e-9, "{result:?}");
        assert_eq!(result.instance_seconds, 500.0);
        assert_eq!(result.latency_p99, Duration::from_millis(100));
    }

    #[test]
    fn too_little_capacity_queues_then_drops() {
        let rates = vec![50.0; 100];
        let result = simulate(
            &rates,
            &config(0),
            &mut Static { instances: 4 },
            &mut |_, _| {},
        );
        // 40 of 50 per second get through and the queue grows by 10/s: under FIFO every
        // request's wait grows past the 2 s SLO within seconds, and past the 10 s timeout the
        // oldest are dropped. Sustained overload fails nearly everyone, as in a real queue.
        assert!(result.availability < 0.1, "{result:?}");
        assert!(result.dropped > 0.0);
        assert_eq!(result.latency_p99, Duration::from_millis(10_100));
    }

    #[test]
    fn startup_delay_costs_availability_for_a_reactive_policy() {
        let mut rates = vec![0.0; 10];
        rates.extend(vec![50.0; 60]);
        let fast = simulate(&rates, &config(0), &mut crate::Reactive, &mut |_, _| {});
        let slow = simulate(&rates, &config(30), &mut crate::Reactive, &mut |_, _| {});
        assert!(
            fast.availability > slow.availability,
            "fast {} slow {}",
            fast.availability,
            slow.availability
        );
        assert!(slow.cold_starts >= 1);
    }

    #[test]
    fn same_inputs_same_result_bit_for_bit() {
        let rates: Vec<f64> = (0..5000)
            .map(|i| 30.0 + 25.0 * ((i as f64) / 300.0).sin())
            .collect();
        let run = || {
            simulate(
                &rates,
                &config(5),
                &mut crate::policies::Hpa::new(0.6),
                &mut |_, _| {},
            )
        };
        let (a, b) = (run(), run());
        assert_eq!(a, b);
        assert_eq!(a.availability.to_bits(), b.availability.to_bits());
    }
}
