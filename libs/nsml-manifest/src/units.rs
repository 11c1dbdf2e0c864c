//! Byte sizes and durations as hosts and participants write them: `170G`, `1.5G`, `512M`, `1h`.
//!
//! Sizes use binary units (`1K` = 1024 bytes), as NSML's `--memory 24G` always did; the unit may be followed by
//! `B`, `i` or `iB` (`24GB`, `24Gi`, `24GiB` all mean the same).

use std::time::Duration;

use crate::ManifestError;

const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];

/// Parses a byte size: a plain number of bytes, or a number (possibly fractional) followed by `K`, `M`, `G` or
/// `T` and optionally `B`, `i` or `iB`, case-insensitive.
pub fn parse_size(input: &str) -> Result<u64, ManifestError> {
    let invalid = || ManifestError::InvalidSize {
        input: input.to_string(),
    };
    let text = input.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
        return Err(invalid());
    }
    let unit = unit.trim_start().to_ascii_uppercase();
    let prefix = unit
        .strip_suffix("IB")
        .or_else(|| unit.strip_suffix('I'))
        .or_else(|| unit.strip_suffix('B'))
        .unwrap_or(&unit);
    let power = match prefix {
        "" => 0,
        "K" => 1,
        "M" => 2,
        "G" => 3,
        "T" => 4,
        _ => return Err(invalid()),
    };
    // `B` alone is bytes, but `i`/`iB` need a prefix (`5i` means nothing).
    if prefix.is_empty() && unit != "B" && !unit.is_empty() {
        return Err(invalid());
    }
    let multiplier = 1024u64.pow(power);
    if let Ok(whole) = number.parse::<u64>() {
        return whole.checked_mul(multiplier).ok_or_else(invalid);
    }
    let value: f64 = number.parse().map_err(|_| invalid())?;
    let bytes = (value * multiplier as f64).round();
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(invalid());
    }
    Ok(bytes as u64)
}

/// Formats a byte count for people: `512 B`, `1.2 KB`, `599.42 MB` (binary units, at most two decimals).
pub fn format_size(bytes: u64) -> String {
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    let text = format!("{value:.2}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    format!("{text} {}", UNITS[unit])
}

/// Parses a duration such as `1h`, `30m`, `1h 30m` or `90s`; a plain number is seconds.
pub fn parse_duration(input: &str) -> Result<Duration, ManifestError> {
    let text = input.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(Duration::from_secs(secs));
    }
    humantime::parse_duration(text).map_err(|e| ManifestError::InvalidDuration {
        input: input.to_string(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1024 * 1024 * 1024;

    #[test]
    fn sizes_use_binary_units_with_optional_suffixes() {
        assert_eq!(parse_size("170G").unwrap(), 170 * G);
        assert_eq!(parse_size("24g").unwrap(), 24 * G);
        assert_eq!(parse_size("24GB").unwrap(), 24 * G);
        assert_eq!(parse_size("24Gi").unwrap(), 24 * G);
        assert_eq!(parse_size("24GiB").unwrap(), 24 * G);
        assert_eq!(parse_size("512M").unwrap(), 512 * 1024 * 1024);
        assert_eq!(parse_size("100K").unwrap(), 102_400);
        assert_eq!(parse_size("1.5G").unwrap(), 3 * G / 2);
        assert_eq!(parse_size("2T").unwrap(), 2 * 1024 * G);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
        assert_eq!(parse_size(" 1 G ").unwrap(), G);
    }

    #[test]
    fn bad_sizes_are_refused_with_the_format() {
        for bad in [
            "",
            "G",
            "24X",
            "1.2.3G",
            "-1G",
            "5i",
            ".5G",
            "24GG",
            "99999999999T",
        ] {
            let err = parse_size(bad).unwrap_err();
            assert!(err.to_string().contains("e.g. 24G, 512M"), "{bad}: {err}");
        }
    }

    #[test]
    fn sizes_format_like_nsml() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1023), "1023 B");
        assert_eq!(format_size(1024), "1 KB");
        assert_eq!(format_size(1229), "1.2 KB");
        assert_eq!(format_size(628_536_033), "599.42 MB");
        assert_eq!(format_size(170 * G), "170 GB");
    }

    #[test]
    fn durations_accept_humantime_and_seconds() {
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1h 30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("600").unwrap(), Duration::from_secs(600));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("1 fortnight").is_err());
    }
}
