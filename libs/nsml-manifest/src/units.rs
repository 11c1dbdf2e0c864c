//! Byte sizes and durations as hosts and participants write them (`170G`, `1.5G`, `512M`, `1h`), the one
//! place the platform reads and prints them: the CLI's `--memory`, a manifest's limits, the runner's limits,
//! quota refusals and `nsml model ls` all go through here.
//!
//! Sizes use binary units (`1K` = 1024 bytes), as NSML's `--memory 24G` always did; the unit may be followed by
//! `B`, `i` or `iB` (`24GB`, `24Gi`, `24GiB` all mean the same). The maintained `bytesize` crate reads `K`/`KB`
//! as 1000 and prints `MiB`, which would change what `24G` means, so the platform keeps its own.

use std::time::Duration;

use crate::ManifestError;

const UNITS: [&str; 6] = ["B", "KB", "MB", "GB", "TB", "PB"];

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

/// Formats a stored amount for people, as `nsml model ls` printed it: `512 B`, `1.2 KB`, `599.42 MB`
/// (binary units, at most two decimals).
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
    format!("{} {}", decimals(value), UNITS[unit])
}

/// Formats a limit or a request the way it is written on a command line, so that it reads back with
/// [`parse_size`]: `64M`, `24G`, `1.5G`, `512K`, `100` (bytes). Wide, so that a sum of memory and shared
/// memory formats as what it is.
pub fn short_size(bytes: impl Into<u128>) -> String {
    const SHORT: [(u128, &str); 5] = [
        (1 << 50, "P"),
        (1 << 40, "T"),
        (1 << 30, "G"),
        (1 << 20, "M"),
        (1 << 10, "K"),
    ];
    let bytes: u128 = bytes.into();
    for (size, unit) in SHORT {
        if bytes >= size {
            if bytes.is_multiple_of(size) {
                return format!("{}{unit}", bytes / size);
            }
            return format!("{}{unit}", decimals(bytes as f64 / size as f64));
        }
    }
    bytes.to_string()
}

/// At most two decimals, without trailing zeros.
fn decimals(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
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
    fn limits_format_as_they_are_written_and_read_back() {
        assert_eq!(short_size(64u64 << 20), "64M");
        assert_eq!(short_size(24 * G), "24G");
        assert_eq!(short_size(3 * G / 2), "1.5G");
        assert_eq!(short_size(512u64 << 10), "512K");
        assert_eq!(short_size(100u64), "100");
        assert_eq!(short_size(2u64 << 40), "2T");
        assert_eq!(short_size(u128::from(u64::MAX) * 2), "32768P");
        for bytes in [64u64 << 20, 24 * G, 3 * G / 2, 512 << 10, 100, 2 << 40] {
            assert_eq!(parse_size(&short_size(bytes)).unwrap(), bytes);
        }
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
