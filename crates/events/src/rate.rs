//! Events appended per second over the last few seconds, for `maru events stats`.

use std::collections::VecDeque;

/// Counts per whole second, the last [`Recent::SECONDS`] kept.
#[derive(Debug, Default, Clone)]
pub struct Recent {
    /// (unix second, events), oldest first.
    seconds: VecDeque<(u64, u64)>,
}

impl Recent {
    /// Seconds of counts kept.
    pub const SECONDS: usize = 60;

    /// `events` were appended during `second`. Seconds are counted in the order they come.
    pub fn count(&mut self, second: u64, events: u64) {
        match self.seconds.back_mut() {
            Some((at, n)) if *at == second => *n += events,
            _ => self.seconds.push_back((second, events)),
        }
        while self.seconds.len() > Self::SECONDS {
            self.seconds.pop_front();
        }
    }

    /// The mean rate over the ten whole seconds before `second`.
    pub fn per_second_last_10s(&self, second: u64) -> f64 {
        let events: u64 = self
            .seconds
            .iter()
            .filter(|(at, _)| *at + 10 >= second && *at < second)
            .map(|(_, n)| n)
            .sum();
        events as f64 / 10.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_the_last_ten_whole_seconds() {
        let mut recent = Recent::default();
        for second in 100..=120 {
            recent.count(second, 3);
        }
        recent.count(120, 7);
        // 110..=119: ten seconds of three; the second under way (120) is not whole yet.
        assert_eq!(recent.per_second_last_10s(120), 3.0);
        assert_eq!(recent.per_second_last_10s(200), 0.0);
        for second in 0..1000 {
            recent.count(1000 + second, 1);
        }
        assert_eq!(recent.seconds.len(), Recent::SECONDS);
    }
}
