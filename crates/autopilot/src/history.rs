//! A service's metrics history: one sample a second for the last hour, and one-minute
//! averages for 14 days. Bounded, and encoded as text with a checksum for persistence by
//! the caller.
//!
//! Held compactly, because a node keeps one for every deployed service and most are idle
//! most of the time: consecutive samples with the same values (an idle stretch: nothing
//! arriving, no instances) are kept as one run, so an idle service's history stays a few
//! hundred bytes however long it idles, where one sample a second would grow to 250 KiB in
//! an hour and 1.4 MiB of minutes in 14 days. The minute being filled is kept as running
//! sums, not as its samples.

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

/// Samples at consecutive times one `step` apart, all with the same values: the first
/// sample and how many there are.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Run {
    first: Sample,
    count: u32,
}

impl Run {
    fn last_unix_s(&self, step: u64) -> u64 {
        self.first.unix_s + u64::from(self.count - 1) * step
    }
}

/// A bounded series of samples `step` seconds apart (or further, where samples are
/// missing), in time order, kept as runs of equal samples.
#[derive(Debug, Clone, PartialEq)]
struct Series {
    runs: VecDeque<Run>,
    /// Samples in all runs.
    len: usize,
    kept: usize,
    step: u64,
}

impl Series {
    fn new(kept: usize, step: u64) -> Series {
        Series {
            runs: VecDeque::new(),
            len: 0,
            kept,
            step,
        }
    }

    fn last_unix_s(&self) -> Option<u64> {
        self.runs.back().map(|run| run.last_unix_s(self.step))
    }

    /// Append `sample`, later than every sample kept, and drop the oldest beyond `kept`.
    fn push(&mut self, sample: Sample) {
        debug_assert!(self.last_unix_s().is_none_or(|last| sample.unix_s > last));
        match self.runs.back_mut() {
            Some(run)
                if run.count < u32::MAX
                    && sample.unix_s == run.last_unix_s(self.step) + self.step
                    && sample.values() == run.first.values() =>
            {
                run.count += 1;
            }
            _ => self.runs.push_back(Run {
                first: sample,
                count: 1,
            }),
        }
        self.len += 1;
        while self.len > self.kept {
            let front = self.runs.front_mut().expect("len counts the runs' samples");
            if front.count == 1 {
                self.runs.pop_front();
            } else {
                front.count -= 1;
                front.first.unix_s += self.step;
            }
            self.len -= 1;
        }
        assert_eq!(
            self.len,
            self.runs
                .iter()
                .map(|run| run.count as usize)
                .sum::<usize>(),
            "a series' length is its runs' samples"
        );
    }

    fn iter(&self) -> impl Iterator<Item = Sample> + '_ {
        let step = self.step;
        self.runs.iter().flat_map(move |run| {
            (0..u64::from(run.count)).map(move |i| Sample {
                unix_s: run.first.unix_s + i * step,
                ..run.first
            })
        })
    }
}

/// The minute being filled: its first sample's time, how many samples, and their sums.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Partial {
    unix_s: u64,
    count: u32,
    sums: [f64; VALUES],
}

#[derive(Debug, Clone, PartialEq)]
pub struct History {
    seconds: Series,
    minutes: Series,
    partial: Option<Partial>,
}

impl Default for History {
    fn default() -> Self {
        History {
            seconds: Series::new(Self::SECONDS_KEPT, 1),
            minutes: Series::new(Self::MINUTES_KEPT, 60),
            partial: None,
        }
    }
}

impl History {
    pub const SECONDS_KEPT: usize = 3600;
    pub const MINUTES_KEPT: usize = 14 * 24 * 60;

    pub fn record(&mut self, sample: Sample) {
        if self
            .seconds
            .last_unix_s()
            .is_some_and(|last| sample.unix_s <= last)
        {
            return; // a clock step backwards or a repeat: the first sample for a second stands
        }
        if self
            .partial
            .is_some_and(|partial| partial.unix_s / 60 != sample.unix_s / 60)
        {
            self.close_minute();
        }
        let partial = self.partial.get_or_insert(Partial {
            unix_s: sample.unix_s,
            count: 0,
            sums: [0.0; VALUES],
        });
        partial.count += 1;
        for (sum, value) in partial.sums.iter_mut().zip(sample.values()) {
            *sum += value;
        }
        self.seconds.push(sample);
    }

    /// The mean of the minute being filled so far, unless a minute for the same time is
    /// kept already (one decoded from a file written during this minute, before a restart:
    /// that one stands).
    fn partial_minute(&self) -> Option<Sample> {
        let partial = self.partial?;
        let n = f64::from(partial.count.max(1));
        let minute = Sample::from_values(partial.unix_s / 60 * 60, partial.sums.map(|s| s / n));
        self.minutes
            .last_unix_s()
            .is_none_or(|last| minute.unix_s > last)
            .then_some(minute)
    }

    fn close_minute(&mut self) {
        if let Some(minute) = self.partial_minute() {
            self.minutes.push(minute);
        }
        self.partial = None;
    }

    /// The last hour's samples, one a second (fewer where the node was not running),
    /// oldest first.
    pub fn seconds(&self) -> impl Iterator<Item = Sample> + '_ {
        self.seconds.iter()
    }

    /// The last 14 days' one-minute means, oldest first.
    pub fn minutes(&self) -> impl Iterator<Item = Sample> + '_ {
        self.minutes.iter()
    }

    /// The first line of an encoded history.
    const VERSION: &str = "maru-history 2";
    /// The first line of a history written before version 2, which had no checksum line.
    const VERSION_1: &str = "maru-history 1";

    /// Text: a version line, then one line per sample, `s` (second) or `m` (minute), the
    /// unix time and the eight values, then `end` and a checksum of everything before that
    /// line (the first 8 bytes of its BLAKE3 hash, in hex), so that a file cut short or
    /// with a flipped bit does not decode. The minute being filled is written as a minute
    /// of the samples so far (and goes on being filled).
    pub fn encode(&self) -> String {
        let mut out = format!("{}\n", Self::VERSION);
        let minutes = self.minutes.iter().chain(self.partial_minute());
        let samples = minutes
            .map(|sample| ("m", sample))
            .chain(self.seconds.iter().map(|sample| ("s", sample)));
        for (kind, sample) in samples {
            out.push_str(kind);
            out.push(' ');
            out.push_str(&sample.unix_s.to_string());
            for value in sample.values() {
                out.push(' ');
                out.push_str(&value.to_string());
            }
            out.push('\n');
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
            if series.last_unix_s().is_some_and(|last| unix_s <= last) {
                return Err(format!("line {}: samples must be in time order", index + 2));
            }
            series.push(sample);
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
        let minutes: Vec<Sample> = history.minutes().collect();
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
    fn saving_in_the_middle_of_a_minute_keeps_every_later_save_readable() {
        // Saved every few minutes at any second: each save reads back, and the minute saved
        // half-filled is kept once (as saved), not twice.
        let mut history = History::default();
        let mut saves = Vec::new();
        for s in 0..400u64 {
            history.record(sample(6_000 + s, (s % 7) as f64));
            if s % 130 == 29 {
                saves.push(history.encode());
            }
        }
        saves.push(history.encode());
        for (i, text) in saves.iter().enumerate() {
            let back = History::decode(text).unwrap_or_else(|e| panic!("save {i}: {e}"));
            assert!(back.minutes().count() >= 1, "save {i}");
        }
        // Restarted from a save made mid-minute, then recording on in that minute: the saved
        // minute stands, the next save reads back.
        let mut restarted = History::decode(&saves[0]).expect("first save");
        let saved_minute = restarted.minutes().last().expect("a minute");
        for s in 30..200u64 {
            restarted.record(sample(6_000 + s, 1.0));
        }
        let again = History::decode(&restarted.encode()).expect("after the restart");
        assert_eq!(
            again.minutes().find(|m| m.unix_s == saved_minute.unix_s),
            Some(saved_minute)
        );
    }

    #[test]
    fn an_idle_stretch_is_kept_as_one_run() {
        // Two hours idle then a busy minute: every second and minute reads back as recorded,
        // bounded as before, while the idle stretch is held as one run of each series.
        let mut history = History::default();
        let mut recorded = Vec::new();
        for s in 0..7_260u64 {
            let busy = s >= 7_200;
            let sample = Sample {
                unix_s: 60_000 + s,
                arrivals: if busy { (s % 5) as f64 } else { 0.0 },
                startup_ms: 12.5,
                ..Sample::default()
            };
            history.record(sample);
            recorded.push(sample);
        }
        let seconds: Vec<Sample> = history.seconds().collect();
        assert_eq!(seconds, recorded[recorded.len() - History::SECONDS_KEPT..]);
        assert_eq!(history.minutes().count(), 120);
        assert!(
            history.seconds.runs.len() <= 61,
            "{}",
            history.seconds.runs.len()
        );
        assert_eq!(history.minutes.runs.len(), 1);
        let back = History::decode(&history.encode()).expect("decode");
        assert_eq!(back.seconds().collect::<Vec<_>>(), seconds);
        // The idle minutes, and the busy minute saved half-filled.
        assert_eq!(back.minutes.runs.len(), 2, "decoded runs are compact too");
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
