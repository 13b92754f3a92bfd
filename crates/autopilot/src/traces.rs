//! Demand traces: parsing the shared trace formats (text in, rates out) and scaling them.
//! Reading the files is the caller's business.

use std::time::Duration;

/// Requests per second, one value per step.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub name: String,
    pub step: Duration,
    pub rates: Vec<f64>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{name}, line {line}: {message}")]
pub struct TraceError {
    pub name: String,
    pub line: usize,
    pub message: String,
}

/// The formats of `../shared/traces` (see its README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// `period,count` with a header; one row per second.
    PerSecondCsv,
    /// `YYYY-MM-DD HH:MM:SS;count`, one row per hour, with real gaps.
    HourlySemicolon,
    /// One line of space-separated counts, one per second.
    PerSecondLine,
    /// Azure Functions: a header, then per function `hash,hash,hash,minute_1,…`; summed.
    PerMinuteFunctions,
}

impl Format {
    /// Guess the format from a trace's file name.
    pub fn from_name(name: &str) -> Option<Format> {
        let name = name.rsplit('/').next().unwrap_or(name);
        if name.starts_with("azure") {
            Some(Format::PerMinuteFunctions)
        } else if name.contains("hourly") {
            Some(Format::HourlySemicolon)
        } else if name.ends_with(".txt") {
            Some(Format::PerSecondLine)
        } else if name.ends_with(".csv") {
            Some(Format::PerSecondCsv)
        } else {
            None
        }
    }
}

pub fn parse(name: &str, format: Format, text: &str) -> Result<Trace, TraceError> {
    let error = |line: usize, message: String| TraceError {
        name: name.to_string(),
        line,
        message,
    };
    let number = |line: usize, field: &str| -> Result<f64, TraceError> {
        let value: f64 = field
            .trim()
            .parse()
            .map_err(|_| error(line, format!("`{}` is not a count", field.trim())))?;
        if value.is_finite() && value >= 0.0 {
            Ok(value)
        } else {
            Err(error(line, format!("`{value}` is not a count")))
        }
    };
    let (step, rates) = match format {
        Format::PerSecondLine => {
            let mut rates = Vec::new();
            for (index, line) in text.lines().enumerate() {
                for field in line.split_whitespace() {
                    rates.push(number(index + 1, field)?);
                }
            }
            (Duration::from_secs(1), rates)
        }
        Format::PerSecondCsv => {
            let mut rates = Vec::new();
            for (index, line) in text.lines().enumerate().skip(1) {
                if line.trim().is_empty() {
                    continue;
                }
                let (_, count) = line
                    .rsplit_once(',')
                    .ok_or_else(|| error(index + 1, "expected `period,count`".into()))?;
                rates.push(number(index + 1, count)?);
            }
            (Duration::from_secs(1), rates)
        }
        Format::HourlySemicolon => {
            // Hours are turned into per-minute steps, interpolating linearly between hours;
            // missing hours (real gaps) are interpolated across, not taken as zero.
            let mut hours: Vec<(i64, f64)> = Vec::new();
            for (index, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                let (stamp, count) = line.split_once(';').ok_or_else(|| {
                    error(index + 1, "expected `YYYY-MM-DD HH:MM:SS;count`".into())
                })?;
                let hour = epoch_hour(stamp.trim())
                    .ok_or_else(|| error(index + 1, format!("`{stamp}` is not a date and time")))?;
                match hours.last() {
                    // A repeated hour (the Wikipedia trace has one, with the same count)
                    // says nothing new: the first one stands.
                    Some((last, _)) if hour == *last => continue,
                    Some((last, _)) if hour < *last => {
                        return Err(error(index + 1, "hours must not go backwards".into()));
                    }
                    _ => {}
                }
                hours.push((hour, number(index + 1, count)? / 3600.0));
            }
            let mut rates = Vec::new();
            for pair in hours.windows(2) {
                let ((h0, r0), (h1, r1)) = (pair[0], pair[1]);
                let minutes = (h1 - h0) * 60;
                for m in 0..minutes {
                    rates.push(r0 + (r1 - r0) * m as f64 / minutes as f64);
                }
            }
            if let Some((_, last)) = hours.last() {
                rates.extend(std::iter::repeat_n(*last, 60));
            }
            (Duration::from_secs(60), rates)
        }
        Format::PerMinuteFunctions => {
            let mut totals: Vec<f64> = Vec::new();
            for (index, line) in text.lines().enumerate().skip(1) {
                if line.trim().is_empty() {
                    continue;
                }
                for (minute, field) in line.split(',').skip(3).enumerate() {
                    if totals.len() <= minute {
                        totals.resize(minute + 1, 0.0);
                    }
                    totals[minute] += number(index + 1, field)?;
                }
            }
            (
                Duration::from_secs(60),
                totals
                    .into_iter()
                    .map(|per_minute| per_minute / 60.0)
                    .collect(),
            )
        }
    };
    if rates.is_empty() {
        return Err(error(1, "the trace holds no counts".into()));
    }
    Ok(Trace {
        name: name.to_string(),
        step,
        rates,
    })
}

/// Hours since 1970 for `YYYY-MM-DD HH:MM:SS` (UTC, proleptic Gregorian).
fn epoch_hour(stamp: &str) -> Option<i64> {
    let (date, time) = stamp.split_once(' ')?;
    let mut date_parts = date.split('-').map(|p| p.parse::<i64>().ok());
    let (year, month, day) = (
        date_parts.next()??,
        date_parts.next()??,
        date_parts.next()??,
    );
    let hour: i64 = time.split(':').next()?.parse().ok()?;
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || !(0..24).contains(&hour) {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 24 + hour)
}

impl Trace {
    /// Scale the rates so the peak equals `peak_rate` requests per second; returns the factor.
    pub fn scale_peak_to(&mut self, peak_rate: f64) -> f64 {
        let peak = self.rates.iter().copied().fold(0.0, f64::max);
        let factor = if peak > 0.0 { peak_rate / peak } else { 1.0 };
        for rate in &mut self.rates {
            *rate *= factor;
        }
        factor
    }

    /// Split at `fraction` of the length: (training part, held-out part).
    pub fn split(&self, fraction: f64) -> (&[f64], &[f64]) {
        let at = ((self.rates.len() as f64) * fraction.clamp(0.0, 1.0)) as usize;
        self.rates.split_at(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_parses() {
        let line = parse("t.txt", Format::PerSecondLine, "1 2 3\n4\n").expect("line");
        assert_eq!(
            (line.step, line.rates),
            (Duration::from_secs(1), vec![1.0, 2.0, 3.0, 4.0])
        );
        let csv = parse(
            "w.csv",
            Format::PerSecondCsv,
            "period,count\n1998-06-25 22:00:01,116\n1998-06-25 22:00:02,281\n",
        )
        .expect("csv");
        assert_eq!(csv.rates, vec![116.0, 281.0]);
        let azure = parse(
            "a.csv",
            Format::PerMinuteFunctions,
            "h,a,o,minute_1,minute_2\nx,y,z,60,0\nq,r,s,60,120\n",
        )
        .expect("azure");
        assert_eq!(
            (azure.step, azure.rates),
            (Duration::from_secs(60), vec![2.0, 2.0])
        );
    }

    #[test]
    fn hourly_interpolates_across_gaps() {
        let text = "2010-05-01 00:00:00;3600\n2010-05-01 01:00:00;7200\n2010-05-01 03:00:00;3600\n";
        let trace =
            parse("wikipedia-en-hourly.csv", Format::HourlySemicolon, text).expect("hourly");
        assert_eq!(trace.step, Duration::from_secs(60));
        assert_eq!(trace.rates.len(), 60 + 120 + 60);
        assert_eq!(trace.rates[0], 1.0);
        assert_eq!(trace.rates[60], 2.0);
        assert_eq!(
            trace.rates[120], 1.5,
            "the missing hour 02:00 is interpolated"
        );
        let repeated = parse(
            "w.csv",
            Format::HourlySemicolon,
            "2010-05-01 00:00:00;3600\n2010-05-01 00:00:00;3600\n2010-05-01 01:00:00;7200\n",
        )
        .expect("a repeated hour is skipped");
        assert_eq!(repeated.rates.len(), 120);
        assert!(
            parse(
                "w.csv",
                Format::HourlySemicolon,
                "2010-05-01 01:00:00;1\n2010-05-01 00:00:00;1\n"
            )
            .is_err()
        );
    }

    #[test]
    fn bad_input_is_located() {
        let error = parse("t.txt", Format::PerSecondLine, "1 2\n3 x\n").expect_err("bad");
        assert_eq!(error.to_string(), "t.txt, line 2: `x` is not a count");
        assert!(parse("h.csv", Format::HourlySemicolon, "2010-13-01 00:00:00;1\n").is_err());
        assert!(parse("e.txt", Format::PerSecondLine, "").is_err());
        assert!(parse("n.txt", Format::PerSecondLine, "-1").is_err());
    }

    #[test]
    fn epoch_hours_match_known_dates() {
        assert_eq!(epoch_hour("1970-01-01 00:00:00"), Some(0));
        assert_eq!(epoch_hour("2000-03-01 05:00:00"), Some(11_017 * 24 + 5));
    }

    #[test]
    fn formats_from_names() {
        assert_eq!(
            Format::from_name("x/azure-functions-2019-1000fn-per-minute.csv"),
            Some(Format::PerMinuteFunctions)
        );
        assert_eq!(
            Format::from_name("wikipedia-en-hourly.csv"),
            Some(Format::HourlySemicolon)
        );
        assert_eq!(
            Format::from_name("nasa95-per-second.txt"),
            Some(Format::PerSecondLine)
        );
        assert_eq!(
            Format::from_name("worldcup98-per-second.csv"),
            Some(Format::PerSecondCsv)
        );
    }
}
