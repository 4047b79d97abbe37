//! Device properties and the routing rules between them (OTS-style).
//!
//! A worker owns one device described by `devicegroup`, `devicename` and
//! `deviceid`. A testrun asks for a device by a spec naming the group and,
//! optionally, name and id. `group` may go to any device of the group;
//! `group.name` only to devices of that name; `group.name.id` only to that
//! one device.

use serde::{Deserialize, Serialize};
use std::fmt;

/// What a worker says about the device it owns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceProps {
    /// Family of interchangeable devices, e.g. `n900`.
    pub devicegroup: String,
    /// Narrower kind within the group; optional for a worker.
    #[serde(default)]
    pub devicename: Option<String>,
    /// Serial number or other unique identity of this one device.
    #[serde(default)]
    pub deviceid: Option<String>,
}

/// What a testrun asks for; parsed from `devicegroup:X [devicename:Y] [deviceid:Z]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceSpec {
    pub devicegroup: String,
    #[serde(default)]
    pub devicename: Option<String>,
    #[serde(default)]
    pub deviceid: Option<String>,
}

/// Why a device spec or device property string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceSpecError {
    #[error("device spec {0:?} has no `devicegroup:` entry; write e.g. \"devicegroup:n900\"")]
    MissingGroup(String),
    #[error(
        "device spec entry {0:?} is not `key:value` with key devicegroup, devicename or deviceid"
    )]
    BadEntry(String),
    #[error("device spec value {0:?} is empty or contains '.', whitespace or ':'")]
    BadValue(String),
    #[error("device spec gives {0} twice")]
    Duplicate(&'static str),
    #[error("device spec gives deviceid without devicename; routing keys are group, group.name or group.name.id")]
    IdWithoutName,
}

fn valid_value(v: &str) -> bool {
    !v.is_empty() && !v.chars().any(|c| c == '.' || c == ':' || c.is_whitespace())
}

impl DeviceSpec {
    /// Parses `devicegroup:X devicename:Y deviceid:Z` (entries in any order,
    /// separated by whitespace or commas).
    pub fn parse(text: &str) -> Result<Self, DeviceSpecError> {
        let (mut group, mut name, mut id) = (None, None, None);
        for entry in text.split(|c: char| c.is_whitespace() || c == ',') {
            if entry.is_empty() {
                continue;
            }
            let (key, value) = entry
                .split_once(':')
                .ok_or_else(|| DeviceSpecError::BadEntry(entry.to_string()))?;
            if !valid_value(value) {
                return Err(DeviceSpecError::BadValue(value.to_string()));
            }
            let (slot, label) = match key {
                "devicegroup" => (&mut group, "devicegroup"),
                "devicename" => (&mut name, "devicename"),
                "deviceid" => (&mut id, "deviceid"),
                _ => return Err(DeviceSpecError::BadEntry(entry.to_string())),
            };
            if slot.replace(value.to_string()).is_some() {
                return Err(DeviceSpecError::Duplicate(label));
            }
        }
        let devicegroup = group.ok_or_else(|| DeviceSpecError::MissingGroup(text.to_string()))?;
        if id.is_some() && name.is_none() {
            return Err(DeviceSpecError::IdWithoutName);
        }
        Ok(DeviceSpec {
            devicegroup,
            devicename: name,
            deviceid: id,
        })
    }

    /// The routing key: `group`, `group.name` or `group.name.id`.
    pub fn routing_key(&self) -> String {
        let mut key = self.devicegroup.clone();
        if let Some(name) = &self.devicename {
            key.push('.');
            key.push_str(name);
            if let Some(id) = &self.deviceid {
                key.push('.');
                key.push_str(id);
            }
        }
        key
    }

    /// True if a device with these properties may run a task asking for this spec.
    pub fn matches(&self, device: &DeviceProps) -> bool {
        self.devicegroup == device.devicegroup
            && self
                .devicename
                .as_ref()
                .is_none_or(|n| device.devicename.as_ref() == Some(n))
            && self
                .deviceid
                .as_ref()
                .is_none_or(|i| device.deviceid.as_ref() == Some(i))
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "devicegroup:{}", self.devicegroup)?;
        if let Some(n) = &self.devicename {
            write!(f, " devicename:{n}")?;
        }
        if let Some(i) = &self.deviceid {
            write!(f, " deviceid:{i}")?;
        }
        Ok(())
    }
}

/// Which devices a worker key may serve: the server's allow-list entry
/// `workers.d/NAME.device` (PROTOCOL.md §15.1), a device spec whose
/// values may be glob patterns (`*`, `?`, `[…]`). A property the pin does
/// not name may be anything; one it names must be present and match.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DevicePin(DeviceSpec);

impl DevicePin {
    pub fn parse(text: &str) -> Result<Self, String> {
        let spec = DeviceSpec::parse(text).map_err(|e| e.to_string())?;
        for v in [
            Some(&spec.devicegroup),
            spec.devicename.as_ref(),
            spec.deviceid.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            glob::Pattern::new(v).map_err(|e| format!("{v:?} is not a glob pattern: {e}"))?;
        }
        Ok(DevicePin(spec))
    }

    /// Whether a worker announcing `device` stays within the pin.
    pub fn allows(&self, device: &DeviceProps) -> bool {
        let fits = |pattern: &str, value: Option<&String>| {
            value.is_some_and(|v| glob::Pattern::new(pattern).is_ok_and(|p| p.matches(v)))
        };
        fits(&self.0.devicegroup, Some(&device.devicegroup))
            && self
                .0
                .devicename
                .as_ref()
                .is_none_or(|p| fits(p, device.devicename.as_ref()))
            && self
                .0
                .deviceid
                .as_ref()
                .is_none_or(|p| fits(p, device.deviceid.as_ref()))
    }
}

impl fmt::Display for DevicePin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl DeviceProps {
    /// Parses a worker's `--device` argument; same syntax as [`DeviceSpec`].
    pub fn parse(text: &str) -> Result<Self, DeviceSpecError> {
        let spec = DeviceSpec::parse(text)?;
        Ok(DeviceProps {
            devicegroup: spec.devicegroup,
            devicename: spec.devicename,
            deviceid: spec.deviceid,
        })
    }

    /// Validates properties that came from a config file or the wire.
    pub fn validate(&self) -> Result<(), DeviceSpecError> {
        for v in [
            Some(&self.devicegroup),
            self.devicename.as_ref(),
            self.deviceid.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            if !valid_value(v) {
                return Err(DeviceSpecError::BadValue(v.clone()));
            }
        }
        Ok(())
    }
}

impl fmt::Display for DeviceProps {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        DeviceSpec {
            devicegroup: self.devicegroup.clone(),
            devicename: self.devicename.clone(),
            deviceid: self.deviceid.clone(),
        }
        .fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(g: &str, n: Option<&str>, i: Option<&str>) -> DeviceProps {
        DeviceProps {
            devicegroup: g.into(),
            devicename: n.map(Into::into),
            deviceid: i.map(Into::into),
        }
    }

    #[test]
    fn group_spec_matches_any_device_of_the_group_only() {
        let spec = DeviceSpec::parse("devicegroup:n900").unwrap();
        assert_eq!(spec.routing_key(), "n900");
        assert!(spec.matches(&dev("n900", None, None)));
        assert!(spec.matches(&dev("n900", Some("rx51"), Some("42"))));
        assert!(!spec.matches(&dev("n950", None, None)));
    }

    #[test]
    fn name_and_id_narrow_the_match() {
        let spec = DeviceSpec::parse("deviceid:42 devicegroup:n900 devicename:rx51").unwrap();
        assert_eq!(spec.routing_key(), "n900.rx51.42");
        assert!(spec.matches(&dev("n900", Some("rx51"), Some("42"))));
        assert!(!spec.matches(&dev("n900", Some("rx51"), Some("43"))));
        assert!(!spec.matches(&dev("n900", None, None)));
        let by_name = DeviceSpec::parse("devicegroup:n900 devicename:rx51").unwrap();
        assert!(by_name.matches(&dev("n900", Some("rx51"), Some("43"))));
        assert!(!by_name.matches(&dev("n900", Some("rx71"), None)));
    }

    #[test]
    fn bad_specs_are_refused_with_a_reason() {
        assert_eq!(
            DeviceSpec::parse("devicename:x"),
            Err(DeviceSpecError::MissingGroup("devicename:x".into()))
        );
        assert!(matches!(
            DeviceSpec::parse("group:x"),
            Err(DeviceSpecError::BadEntry(_))
        ));
        assert!(matches!(
            DeviceSpec::parse("devicegroup:a.b"),
            Err(DeviceSpecError::BadValue(_))
        ));
        assert_eq!(
            DeviceSpec::parse("devicegroup:a devicegroup:b"),
            Err(DeviceSpecError::Duplicate("devicegroup"))
        );
        assert_eq!(
            DeviceSpec::parse("devicegroup:a deviceid:1"),
            Err(DeviceSpecError::IdWithoutName)
        );
    }

    #[test]
    fn a_pin_allows_only_the_devices_it_names() {
        let pin = DevicePin::parse("devicegroup:lab devicename:n900-* deviceid:dev4?").unwrap();
        let d = |t: &str| DeviceProps::parse(t).unwrap();
        assert!(pin.allows(&d("devicegroup:lab devicename:n900-a deviceid:dev42")));
        assert!(!pin.allows(&d("devicegroup:lab devicename:n900-a deviceid:dev420")));
        assert!(
            !pin.allows(&d("devicegroup:lab devicename:n900-a")),
            "a named property must be there"
        );
        assert!(!pin.allows(&d("devicegroup:other devicename:n900-a deviceid:dev42")));
        let group = DevicePin::parse("devicegroup:lab").unwrap();
        assert!(group.allows(&d("devicegroup:lab devicename:anything deviceid:x")));
        assert!(
            !group.allows(&d("devicegroup:*")),
            "values are matched, not patterns"
        );
        assert!(DevicePin::parse("devicegroup:[").is_err());
        assert!(DevicePin::parse("devicename:x").is_err());
    }
}
