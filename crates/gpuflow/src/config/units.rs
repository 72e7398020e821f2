//! Durations (`10m`, `1h30m`, `500ms`, `10 s`) and byte sizes (`6GiB`, `512MiB`, `8 GB`) as
//! written in pipeline files.
//!
//! One rule for both: a number, optional spaces, then a unit. Durations are parsed by
//! `humantime`, sizes by `bytesize`; this module only adds the checks those crates leave to the
//! caller (a unit is required on durations, sizes must not be ambiguous or overflow). Every
//! duration or size the engine reads from text goes through `parse_duration` or `parse_bytes`.

use std::fmt;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer};

/// A duration in milliseconds, written like `90s`, `10m`, `1h30m`, `250ms` or `1.5s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Millis(pub u64);

/// A byte count, written like `6GiB`, `512MiB`, `8GB` or a plain integer of bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Bytes(pub u64);

const DURATION_EXAMPLES: &str =
    "write a number and a unit, e.g. `30s`, `10 m`, `1h30m` or `500ms` (units: ms, s, m, h, d)";
const SIZE_EXAMPLES: &str = "write a number and a unit, e.g. `6GiB`, `512 MiB` or `8GB` (KiB, MiB, GiB, TiB are powers of 1024; KB, MB, GB, TB powers of 1000), or a number of bytes";

/// Parses a duration into whole milliseconds.
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let s = text.trim();
    if s.is_empty() {
        return Err(format!("an empty value is not a duration; {DURATION_EXAMPLES}"));
    }
    if s.parse::<f64>().is_ok() {
        return Err(format!("`{s}` needs a unit; write e.g. `{s}s` or `{s}ms`"));
    }
    let duration = humantime::parse_duration(s).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, .. } => {
            format!("unknown duration unit `{unit}` in `{s}`; {DURATION_EXAMPLES}")
        }
        humantime::DurationError::NumberOverflow => format!("`{s}` is too long"),
        other => format!("`{s}` is not a duration ({other}); {DURATION_EXAMPLES}"),
    })?;
    let ms = duration.as_secs_f64() * 1_000.0;
    if ms > (u64::MAX / 2) as f64 {
        return Err(format!("`{s}` is too long"));
    }
    if !duration.is_zero() && ms < 0.5 {
        return Err(format!("`{s}` is shorter than the engine's resolution of 1ms; write at least `1ms`"));
    }
    Ok(ms.round() as u64)
}

/// Parses a size into bytes. Single-letter units (`6G`) are refused: tools disagree on
/// whether they mean powers of 1000 or of 1024.
pub fn parse_bytes(text: &str) -> Result<u64, String> {
    let s = text.trim();
    let number_len = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (number, unit) = (&s[..number_len], s[number_len..].trim_start());
    if number.is_empty() || number.parse::<f64>().is_err() {
        return Err(format!("`{s}` is not a size; {SIZE_EXAMPLES}"));
    }
    if unit.len() <= 2 && unit.chars().next().is_some_and(|c| "kKmMgGtTpPeE".contains(c)) && !unit.ends_with(['b', 'B'])
    {
        let letter = unit[..1].to_ascii_uppercase();
        return Err(format!(
            "`{s}` is ambiguous; write `{number}{letter}iB` (powers of 1024) or `{number}{letter}B` (powers of 1000)"
        ));
    }
    let size: bytesize::ByteSize = s.parse().map_err(|_| {
        if unit.is_empty() {
            format!("`{s}` is not a size; {SIZE_EXAMPLES}")
        } else {
            format!("unknown size unit `{unit}` in `{s}`; {SIZE_EXAMPLES}")
        }
    })?;
    // The crate saturates at u64::MAX instead of failing.
    if size.0 >= u64::MAX / 2 {
        return Err(format!("`{s}` is out of range"));
    }
    Ok(size.0)
}

struct UnitVisitor {
    expecting: &'static str,
    parse: fn(&str) -> Result<u64, String>,
    bare_numbers: bool,
}

impl<'de> Visitor<'de> for UnitVisitor {
    type Value = u64;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.expecting)
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
        (self.parse)(v).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
        if self.bare_numbers {
            Ok(v)
        } else {
            Err(E::custom(format!("`{v}` needs a unit; write e.g. `{v}s` or `{v}ms`")))
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<u64, E> {
        if self.bare_numbers {
            Err(E::custom(format!("`{v}` is not a whole number of bytes; write e.g. `{v}GiB`, or an integer")))
        } else {
            Err(E::custom(format!("`{v}` needs a unit; write e.g. `{v}s` or `{v}ms`")))
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
        if v < 0 {
            return Err(E::custom(format!("`{v}` is negative")));
        }
        self.visit_u64(v as u64)
    }
}

impl<'de> Deserialize<'de> for Millis {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor {
            expecting: "a duration such as `30s`, `10m`, `1h30m` or `500ms`",
            parse: parse_duration,
            bare_numbers: false,
        })
        .map(Millis)
    }
}

impl<'de> Deserialize<'de> for Bytes {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnitVisitor {
            expecting: "a size such as `6GiB`, `512MiB` or `8GB`",
            parse: parse_bytes,
            bare_numbers: true,
        })
        .map(Bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_one_unit_rule_with_or_without_spaces() {
        assert_eq!(parse_duration("10m"), Ok(600_000));
        assert_eq!(parse_duration("1h30m"), Ok(5_400_000));
        assert_eq!(parse_duration("1h 30m"), Ok(5_400_000));
        assert_eq!(parse_duration("1.5s"), Ok(1_500));
        assert_eq!(parse_duration("250ms"), Ok(250));
        assert_eq!(parse_duration("10 s"), Ok(10_000), "spaces between number and unit are allowed");
        assert_eq!(parse_duration(" 2 min "), Ok(120_000));
        assert_eq!(parse_duration("0s"), Ok(0));
        assert!(parse_duration("10").unwrap_err().contains("needs a unit"));
        assert!(parse_duration("10 parsecs").unwrap_err().contains("unknown duration unit `parsecs`"));
        assert!(parse_duration("-5s").unwrap_err().contains("not a duration"));
        assert!(parse_duration("").unwrap_err().contains("empty"));
        assert!(parse_duration("300us").unwrap_err().contains("1ms"));
    }

    #[test]
    fn sizes_take_one_unit_rule_and_say_which_base() {
        assert_eq!(parse_bytes("6GiB"), Ok(6 << 30));
        assert_eq!(parse_bytes("6 GiB"), Ok(6 << 30), "spaces between number and unit are allowed");
        assert_eq!(parse_bytes("512MiB"), Ok(512 << 20));
        assert_eq!(parse_bytes("8GB"), Ok(8_000_000_000));
        assert_eq!(parse_bytes("6 GB"), Ok(6_000_000_000));
        assert_eq!(parse_bytes("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("100 B"), Ok(100));
        assert!(parse_bytes("6 gigs").unwrap_err().contains("unknown size unit `gigs`"));
        let e = parse_bytes("6G").unwrap_err();
        assert!(e.contains("ambiguous") && e.contains("`6GiB`") && e.contains("`6GB`"), "{e}");
        assert!(parse_bytes("99999999999TB").unwrap_err().contains("out of range"));
        assert!(parse_bytes("-1").unwrap_err().contains("not a size"));
    }
}
