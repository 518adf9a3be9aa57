//! Human byte sizes: `512MiB`, `10GiB`, `1TiB`, `1G`, `4096`.
//!
//! Binary units (KiB, MiB, ...) and the short forms (K, M, G, T, P) are powers
//! of 1024, as in dd and qemu-img; decimal units (KB, MB, GB, TB) are powers of 1000.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("size is empty")]
    Empty,
    #[error("size {input:?} is not a number with an optional unit (examples: 4096, 512MiB, 10GiB, 1T)")]
    Malformed { input: String },
    #[error("unknown unit {unit:?} in size {input:?} (use B, K/KiB, M/MiB, G/GiB, T/TiB, P/PiB, KB, MB, GB, TB)")]
    UnknownUnit { input: String, unit: String },
    #[error("size {input:?} does not fit in 64 bits")]
    Overflow { input: String },
}

/// Parses a size such as `512MiB`, `1.5G` or `4096` into bytes.
pub fn parse_size(input: &str) -> Result<u64, SizeError> {
    let s = input.trim();
    if s.is_empty() {
        return Err(SizeError::Empty);
    }
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let unit = unit.trim();
    if num.is_empty() || num.starts_with('.') || num.ends_with('.') || num.matches('.').count() > 1 {
        return Err(SizeError::Malformed { input: input.to_string() });
    }
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "p" | "pib" => 1 << 50,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(SizeError::UnknownUnit { input: input.to_string(), unit: unit.to_string() }),
    };
    let overflow = || SizeError::Overflow { input: input.to_string() };
    match num.split_once('.') {
        None => {
            let n: u64 = num.parse().map_err(|_| overflow())?;
            n.checked_mul(mult).ok_or_else(overflow)
        }
        Some((int, frac)) => {
            // Exact decimal arithmetic: int * mult + frac * mult / 10^len(frac).
            let int: u64 = int.parse().map_err(|_| overflow())?;
            if frac.len() > 18 {
                return Err(SizeError::Malformed { input: input.to_string() });
            }
            let frac_n: u128 = frac.parse().map_err(|_| SizeError::Malformed { input: input.to_string() })?;
            let scale = 10u128.pow(frac.len() as u32);
            let whole = (int as u128).checked_mul(mult as u128).ok_or_else(overflow)?;
            let part = frac_n * mult as u128 / scale;
            u64::try_from(whole + part).map_err(|_| overflow())
        }
    }
}

/// Formats bytes in the largest binary unit that keeps one decimal: `1.5 GiB`.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1024.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else if (v - v.round()).abs() < 0.05 {
        format!("{:.0} {}", v, UNITS[i])
    } else {
        format!("{:.1} {}", v, UNITS[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1TiB"), Ok(1 << 40));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("2 MiB"), Ok(2 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
    }

    #[test]
    fn rejects_bad_sizes() {
        assert_eq!(parse_size(""), Err(SizeError::Empty));
        assert!(matches!(parse_size("abc"), Err(SizeError::Malformed { .. })));
        assert!(matches!(parse_size("-5G"), Err(SizeError::Malformed { .. })));
        assert!(matches!(parse_size("10XB"), Err(SizeError::UnknownUnit { .. })));
        assert!(matches!(parse_size("1.2.3G"), Err(SizeError::Malformed { .. })));
        assert!(matches!(parse_size("99999999999P"), Err(SizeError::Overflow { .. })));
    }

    #[test]
    fn formats() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
    }
}
