//! Durations in configuration: a number in the key's unit (`_ms`, `_secs`,
//! `_hours`) or a text such as `30s`, `5m`, `1h 30m`, `2d` (humantime).

use serde::{de, Deserialize, Deserializer};

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Number(u64),
    Text(String),
}

fn parse<'de, D: Deserializer<'de>>(d: D, unit_ms: u64) -> Result<u64, D::Error> {
    match Raw::deserialize(d)? {
        Raw::Number(n) => Ok(n),
        Raw::Text(t) => {
            if let Ok(n) = t.trim().parse::<u64>() {
                return Ok(n);
            }
            let dur = humantime::parse_duration(t.trim()).map_err(|e| {
                de::Error::custom(format!(
                    "{t:?} is not a duration ({e}); write e.g. 500ms, 30s, 5m, 1h 30m, 2d or a number"
                ))
            })?;
            let ms = u64::try_from(dur.as_millis()).unwrap_or(u64::MAX);
            if ms % unit_ms != 0 {
                return Err(de::Error::custom(format!(
                    "{t:?} is not a whole number of {}",
                    match unit_ms {
                        1000 => "seconds",
                        3_600_000 => "hours",
                        _ => "milliseconds",
                    }
                )));
            }
            Ok(ms / unit_ms)
        }
    }
}

pub fn ms<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    parse(d, 1)
}

pub fn secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    parse(d, 1000)
}

pub fn hours<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    parse(d, 3_600_000)
}
