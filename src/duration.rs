//! Durations as operators write them: plain seconds (`2`, `0.5`) or a number
//! with a unit (`500ms`, `30s`, `5m`, `1h`, `250us`).
//!
//! Used by the configuration file, the command line and the contact files;
//! errors say what was wrong so the caller can add where (setting, file:line).

use std::time::Duration;

/// Parses `s` as a duration. Negative, non-finite and absurd (over ten
/// years) values are refused.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    if number.is_empty() {
        return Err(format!("'{t}' does not start with a number"));
    }
    let value: f64 = number
        .parse()
        .map_err(|_| format!("'{number}' is not a number"))?;
    let seconds_per_unit = match unit.trim() {
        "" | "s" | "sec" => 1.0,
        "ms" => 1e-3,
        "us" | "µs" => 1e-6,
        "m" | "min" => 60.0,
        "h" => 3600.0,
        other => {
            return Err(format!(
                "unknown unit '{other}' in '{t}' (use us, ms, s, m or h; plain numbers are seconds)"
            ))
        }
    };
    from_seconds(value * seconds_per_unit).map_err(|_| format!("'{t}' is out of range"))
}

/// The longest duration any setting or contact takes: ten years.
pub const MAX_SECONDS: f64 = 10.0 * 365.0 * 86400.0;

/// A number of seconds as every source reads it (a JSON or TOML number):
/// negative, non-finite and absurd values are refused, never panicked on.
pub fn from_seconds(seconds: f64) -> Result<Duration, String> {
    if !(0.0..=MAX_SECONDS).contains(&seconds) {
        return Err(format!(
            "{seconds} is out of range (0 to {MAX_SECONDS} seconds)"
        ));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_seconds_and_units() {
        let ms = |s| parse_duration(s).unwrap().as_micros() as u64;
        assert_eq!(ms("2"), 2_000_000);
        assert_eq!(ms("0.5"), 500_000);
        assert_eq!(ms("500ms"), 500_000);
        assert_eq!(ms("30s"), 30_000_000);
        assert_eq!(ms(" 5m "), 300_000_000);
        assert_eq!(ms("1h"), 3_600_000_000);
        assert_eq!(ms("250us"), 250);
        assert_eq!(ms("1.5 s"), 1_500_000);
    }

    #[test]
    fn refuses_nonsense_with_a_reason() {
        for (s, why) in [
            ("", "empty"),
            ("ms", "does not start with a number"),
            ("-1", "does not start with a number"),
            ("1.2.3", "not a number"),
            ("10 parsecs", "unknown unit"),
            ("99999999999", "out of range"),
        ] {
            let e = parse_duration(s).unwrap_err();
            assert!(e.contains(why), "{s:?}: {e}");
        }
    }
}
