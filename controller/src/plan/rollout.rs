//! How a component's instances change in a deployment, as a catalog's
//! `[rollout]` table and a plan's optional `"rollout"` overrides write it:
//! canaries first, at most `max_in_flight` at once (a count or a
//! percentage), a watch after each instance's steps, and whether the
//! component waits for the ones before it. Every key is optional; a plan's
//! value wins over the catalog's, the catalog's over the default.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// `max_in_flight`: how many instances of a component change at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InFlight {
    /// At most this many (at least 1).
    Count(u32),
    /// This percentage of the component's instances in the plan, rounded
    /// down, at least 1 (1-100).
    Percent(u32),
}

impl InFlight {
    /// The bound for a component with `instances` instances: a count as it
    /// is, a percentage rounded down and at least 1.
    pub(crate) fn resolve(self, instances: usize) -> usize {
        match self {
            InFlight::Count(n) => usize::try_from(n).unwrap_or(usize::MAX).max(1),
            InFlight::Percent(p) => {
                let p = usize::try_from(p).unwrap_or(100);
                (instances.saturating_mul(p) / 100).max(1)
            }
        }
    }
}

impl Serialize for InFlight {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            InFlight::Count(n) => s.serialize_u32(*n),
            InFlight::Percent(p) => s.serialize_str(&format!("{p}%")),
        }
    }
}

impl<'de> Deserialize<'de> for InFlight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<InFlight, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = InFlight;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of instances (at least 1) or a percentage such as \"50%\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<InFlight, E> {
                match u32::try_from(v) {
                    Ok(n) if n >= 1 => Ok(InFlight::Count(n)),
                    _ => Err(E::custom(format!(
                        "max_in_flight {v} is out of range: give at least 1, or a percentage such as \"50%\""
                    ))),
                }
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<InFlight, E> {
                self.visit_i64(i64::try_from(v).unwrap_or(i64::MAX))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<InFlight, E> {
                let bad = || {
                    E::custom(format!(
                        "max_in_flight {v:?} is not a percentage: write 1% to 100%, e.g. \"50%\""
                    ))
                };
                let p: u32 = v
                    .trim()
                    .strip_suffix('%')
                    .ok_or_else(bad)?
                    .trim()
                    .parse()
                    .map_err(|_| bad())?;
                if (1..=100).contains(&p) {
                    Ok(InFlight::Percent(p))
                } else {
                    Err(bad())
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// A component's rollout as a catalog's `[rollout]` or a plan's override
/// writes it; every key optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// This many instances change first; if one fails, no other instance
    /// of the component is touched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canaries: Option<u32>,
    /// How many instances change at once (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_in_flight: Option<InFlight>,
    /// After its steps, an instance counts done only once monit reports it
    /// RUNNING and it stays so this long (default 0: no watch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watch_secs: Option<u64>,
    /// Whether the component waits for every component before it (default
    /// true); `false`: only for the ones in its `after` list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<bool>,
}

/// The longest watch a catalog or plan may ask for (one hour).
pub(crate) const MAX_WATCH_SECS: u64 = 3600;

impl RolloutSpec {
    /// `over`'s keys where it sets them, else this one's.
    pub(crate) fn overridden_by(&self, over: Option<&RolloutSpec>) -> RolloutSpec {
        let Some(o) = over else {
            return self.clone();
        };
        RolloutSpec {
            canaries: o.canaries.or(self.canaries),
            max_in_flight: o.max_in_flight.or(self.max_in_flight),
            watch_secs: o.watch_secs.or(self.watch_secs),
            serial: o.serial.or(self.serial),
        }
    }

    /// What is wrong with it, in words, if anything.
    pub(crate) fn problem(&self) -> Option<String> {
        match self.watch_secs {
            Some(w) if w > MAX_WATCH_SECS => Some(format!(
                "watch_secs {w} is too long: at most {MAX_WATCH_SECS}"
            )),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_in_flight_is_a_count_or_a_percentage_rounded_down_and_at_least_one() {
        let parse = |s: &str| serde_json::from_str::<InFlight>(s).map_err(|e| e.to_string());
        assert_eq!(parse("2"), Ok(InFlight::Count(2)));
        assert_eq!(parse("\"50%\""), Ok(InFlight::Percent(50)));
        for bad in ["0", "-1", "\"0%\"", "\"101%\"", "\"half\"", "1.5"] {
            assert!(parse(bad).is_err(), "{bad} accepted");
        }
        assert_eq!(InFlight::Count(2).resolve(5), 2);
        assert_eq!(InFlight::Count(9).resolve(3), 9);
        assert_eq!(InFlight::Percent(50).resolve(5), 2, "2.5 rounds down");
        assert_eq!(InFlight::Percent(50).resolve(4), 2);
        assert_eq!(InFlight::Percent(10).resolve(3), 1, "0.3 is at least 1");
        assert_eq!(InFlight::Percent(100).resolve(3), 3);
        assert_eq!(
            serde_json::to_string(&InFlight::Percent(25)).expect("json"),
            "\"25%\""
        );
    }

    #[test]
    fn a_plans_keys_win_over_the_catalogs() {
        let catalog: RolloutSpec =
            toml::from_str("canaries = 1\nmax_in_flight = \"50%\"\nwatch_secs = 5\n")
                .expect("toml");
        let plan: RolloutSpec =
            serde_json::from_str(r#"{"max_in_flight": 1, "serial": false}"#).expect("json");
        assert_eq!(
            catalog.overridden_by(Some(&plan)),
            RolloutSpec {
                canaries: Some(1),
                max_in_flight: Some(InFlight::Count(1)),
                watch_secs: Some(5),
                serial: Some(false),
            }
        );
        assert!(toml::from_str::<RolloutSpec>("canary = 1\n").is_err());
    }
}
