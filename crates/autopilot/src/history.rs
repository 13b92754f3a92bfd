//! A service's metrics history: one sample a second for the last hour, and one-minute
//! averages for 14 days. Bounded, and encoded as text with a checksum for persistence by
//! the caller.

use std::collections::VecDeque;

/// One second (or, in the minute series, the mean of a minute) of a service's signals.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    /// Unix time of the start of the second (or minute).
    pub unix_s: u64,
    /// Requests arriving per second.
    pub arrivals: f64,
    /// Requests finishing per second.
    pub completions: f64,
    pub in_flight: f64,
    pub queued: f64,
    /// Mean latency of the requests that finished, ms (0 when none did).
    pub latency_ms: f64,
    /// Instances, ready or starting.
    pub instances: f64,
    /// Cold starts in the second (in the minute series: per second, averaged).
    pub cold_starts: f64,
    /// Start-up time of the instance that last became ready, ms; 0 until one has.
    pub startup_ms: f64,
}

/// Values per sample after its time.
const VALUES: usize = 8;
/// Values per sample in version 1, which had no start-up time.
const VALUES_1: usize = 7;

impl Sample {
    fn values(&self) -> [f64; VALUES] {
        [
            self.arrivals,
            self.completions,
            self.in_flight,
            self.queued,
            self.latency_ms,
            self.instances,
            self.cold_starts,
            self.startup_ms,
        ]
    }

    fn from_values(unix_s: u64, v: [f64; VALUES]) -> Sample {
        Sample {
            unix_s,
            arrivals: v[0],
            completions: v[1],
            in_flight: v[2],
            queued: v[3],
            latency_ms: v[4],
            instances: v[5],
            cold_starts: v[6],
            startup_ms: v[7],
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    seconds: VecDeque<Sample>,
    minutes: VecDeque<Sample>,
    /// Samples of the minute being filled.
    partial: Vec<Sample>,
}

impl History {
    pub const SECONDS_KEPT: usize = 3600;
    pub const MINUTES_KEPT: usize = 14 * 24 * 60;

    pub fn record(&mut self, sample: Sample) {
        if self
            .seconds
            .back()
            .is_some_and(|last| sample.unix_s <= last.unix_s)
        {
            return; // a clock step backwards or a repeat: the first sample for a second stands
        }
        if self
            .partial
            .first()
            .is_some_and(|first| first.unix_s / 60 != sample.unix_s / 60)
        {
            self.close_minute();
        }
        self.partial.push(sample);
        self.seconds.push_back(sample);
        if self.seconds.len() > Self::SECONDS_KEPT {
            self.seconds.pop_front();
        }
    }

    fn close_minute(&mut self) {
        let Some(first) = self.partial.first() else {
            return;
        };
        let n = self.partial.len() as f64;
        let mut sums = [0.0; VALUES];
        for sample in &self.partial {
            for (sum, value) in sums.iter_mut().zip(sample.values()) {
                *sum += value;
            }
        }
        let minute = Sample::from_values(first.unix_s / 60 * 60, sums.map(|s| s / n));
        self.partial.clear();
        self.minutes.push_back(minute);
        if self.minutes.len() > Self::MINUTES_KEPT {
            self.minutes.pop_front();
        }
    }

    pub fn seconds(&self) -> impl Iterator<Item = &Sample> {
        self.seconds.iter()
    }

    pub fn minutes(&self) -> impl Iterator<Item = &Sample> {
        self.minutes.iter()
    }

    /// The first line of an encoded history.
    const VERSION: &str = "maru-history 2";
    /// The first line of a history written before version 2, which had no checksum line.
    const VERSION_1: &str = "maru-history 1";

    /// Text: a version line, then one line per sample, `s` (second) or `m` (minute), the
    /// unix time and the eight values, then `end` and a checksum of everything before that
    /// line (the first 8 bytes of its BLAKE3 hash, in hex), so that a file cut short or
    /// with a flipped bit does not decode. The minute being filled is closed first.
    pub fn encode(&mut self) -> String {
        self.close_minute();
        let mut out = format!("{}\n", Self::VERSION);
        for (kind, series) in [("m", &self.minutes), ("s", &self.seconds)] {
            for sample in series {
                out.push_str(kind);
                out.push(' ');
                out.push_str(&sample.unix_s.to_string());
                for value in sample.values() {
                    out.push(' ');
                    out.push_str(&value.to_string());
                }
                out.push('\n');
            }
        }
        let sum = checksum(&out);
        out.push_str("end ");
        out.push_str(&sum);
        out.push('\n');
        out
    }

    /// The inverse of [`History::encode`] (also reads version 1, written before the
    /// checksum line and the start-up time: its start-up times read as 0); says what is
    /// wrong: a bad checksum, or the first bad line.
    pub fn decode(text: &str) -> Result<History, String> {
        let (body, values_per_line) = match text.lines().next() {
            Some(Self::VERSION_1) => (text, VALUES_1),
            Some(Self::VERSION) => {
                let (body, last) = text
                    .strip_suffix('\n')
                    .and_then(|whole| whole.rfind('\n').map(|at| whole.split_at(at + 1)))
                    .ok_or("the file ends before its checksum line: it was cut short")?;
                let sum = last.strip_prefix("end ").ok_or(
                    "the last line is not `end CHECKSUM`: the file was cut short or damaged",
                )?;
                if sum != checksum(body) {
                    return Err(
                        "the checksum does not match the samples: the file is damaged".into(),
                    );
                }
                (body, VALUES)
            }
            _ => {
                return Err(format!(
                    "line 1: not a maru history (expected `{}`)",
                    Self::VERSION
                ));
            }
        };
        let mut history = History::default();
        for (index, line) in body.lines().skip(1).enumerate() {
            let bad = || {
                format!(
                    "line {}: `{}` is not a sample",
                    index + 2,
                    line.chars().take(60).collect::<String>()
                )
            };
            let mut fields = line.split(' ');
            let kind = fields.next().ok_or_else(bad)?;
            let unix_s: u64 = fields.next().and_then(|f| f.parse().ok()).ok_or_else(bad)?;
            let mut values = [0.0; VALUES];
            for value in &mut values[..values_per_line] {
                *value = fields
                    .next()
                    .and_then(|f| f.parse::<f64>().ok())
                    .filter(|v| v.is_finite())
                    .ok_or_else(bad)?;
            }
            if fields.next().is_some() {
                return Err(bad());
            }
            let sample = Sample::from_values(unix_s, values);
            let series = match kind {
                "s" => &mut history.seconds,
                "m" => &mut history.minutes,
                _ => return Err(bad()),
            };
            if series.back().is_some_and(|last| unix_s <= last.unix_s) {
                return Err(format!("line {}: samples must be in time order", index + 2));
            }
            series.push_back(sample);
        }
        while history.seconds.len() > Self::SECONDS_KEPT {
            history.seconds.pop_front();
        }
        while history.minutes.len() > Self::MINUTES_KEPT {
            history.minutes.pop_front();
        }
        Ok(history)
    }
}

/// The first 8 bytes of the BLAKE3 hash of `text`, in hex.
fn checksum(text: &str) -> String {
    blake3::hash(text.as_bytes()).to_hex()[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(unix_s: u64, arrivals: f64) -> Sample {
        Sample {
            unix_s,
            arrivals,
            ..Sample::default()
        }
    }

    #[test]
    fn seconds_roll_into_minute_means_and_stay_bounded() {
        let mut history = History::default();
        for s in 0..(History::SECONDS_KEPT as u64 + 120) {
            history.record(sample(1_000_020 + s, (s % 60) as f64));
        }
        assert_eq!(history.seconds().count(), History::SECONDS_KEPT);
        let minutes: Vec<&Sample> = history.minutes().collect();
        // The first minute (from 1_000_020, unix minute boundary at 1_000_020 / 60 * 60) is
        // partial; later ones are whole.
        assert_eq!(minutes[0].unix_s % 60, 0);
        assert!(
            minutes
                .iter()
                .all(|m| m.arrivals >= 0.0 && m.arrivals < 60.0)
        );
        history.record(sample(1_000_000, 5.0));
        assert_eq!(
            history.seconds().last().map(|s| s.arrivals),
            Some(((History::SECONDS_KEPT as u64 + 119) % 60) as f64),
            "an old sample is ignored"
        );
    }

    #[test]
    fn encode_decode_round_trip() {
        let text = encoded();
        let back = History::decode(&text).expect("decode");
        assert!(back.seconds().all(|s| s.startup_ms == 2400.0));
        assert_eq!(back.seconds().count(), 200);
        assert_eq!(back.minutes().count(), 4);
        assert_eq!(
            History::decode(&text).expect("decode").encode(),
            text.clone(),
            "stable"
        );
        assert!(History::decode("nonsense").is_err());
        let error = History::decode(&text.replacen("s 6001", "s 6001x", 1)).expect_err("bad line");
        assert!(error.contains("checksum"), "{error}");
        // A version 1 file: no start-up time (the last value) and no checksum line.
        let version_1 = text
            .replacen("maru-history 2", "maru-history 1", 1)
            .lines()
            .filter(|line| !line.starts_with("end "))
            .map(|line| match line.rsplit_once(' ') {
                Some((rest, _)) if line.starts_with("s ") || line.starts_with("m ") => {
                    format!("{rest}\n")
                }
                _ => format!("{line}\n"),
            })
            .collect::<String>();
        let old = History::decode(&version_1).expect("version 1 decodes");
        assert_eq!(old.seconds().count(), 200);
        assert!(
            old.seconds()
                .all(|s| s.startup_ms == 0.0 && s.latency_ms == 1.5)
        );
        let error =
            History::decode(&version_1.replacen("s 6001", "s 6001x", 1)).expect_err("bad line");
        assert!(error.starts_with("line 7:"), "{error}");
    }

    /// 200 seconds (unix 6000-6199, so four minutes) of samples, encoded.
    fn encoded() -> String {
        let mut history = History::default();
        for s in 0..200 {
            history.record(Sample {
                unix_s: 6000 + s,
                arrivals: s as f64 / 3.0,
                completions: 3.25,
                latency_ms: 1.5,
                instances: 2.0,
                startup_ms: 2400.0,
                ..Sample::default()
            });
        }
        history.encode()
    }

    #[test]
    fn a_history_cut_short_anywhere_does_not_decode() {
        // A torn write: every proper prefix is refused.
        let text = encoded();
        for end in 0..text.len() {
            assert!(
                History::decode(&text[..end]).is_err(),
                "decoded when cut at byte {end} of {}",
                text.len()
            );
        }
    }

    proptest! {
        #[test]
        fn a_flipped_bit_anywhere_does_not_decode(at in 0usize..10_000, bit in 0u8..8) {
            let mut bytes = encoded().into_bytes();
            let at = at % bytes.len();
            bytes[at] ^= 1 << bit;
            // A flip that breaks UTF-8 is refused before decoding (the node reads text).
            if let Ok(text) = String::from_utf8(bytes) {
                prop_assert!(
                    History::decode(&text).is_err(),
                    "decoded with byte {at} bit {bit} flipped"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn decode_never_panics(text in "maru-history [12]\n[ems0-9a-f .\n-]{0,200}") {
            _ = History::decode(&text);
        }
    }
}
