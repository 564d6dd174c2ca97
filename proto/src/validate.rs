//! Validation of names, addresses and registrations, shared by the control
//! plane (which answers `InvalidArgument`) and wfctl (which refuses early).

use std::net::IpAddr;

use thiserror::Error;

use crate::v1::Instance;

/// Longest service name (a DNS label).
pub const MAX_SERVICE_NAME: usize = 63;
/// Longest instance id.
pub const MAX_INSTANCE_ID: usize = 128;
/// Most labels on one instance.
pub const MAX_LABELS: usize = 32;
/// Longest label key or value.
pub const MAX_LABEL_LEN: usize = 253;
/// Highest instance weight.
pub const MAX_WEIGHT: u32 = 10_000;
/// Weight used when a registration gives 0.
pub const DEFAULT_WEIGHT: u32 = 100;

/// Why a name, address or registration was refused.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum InvalidInput {
    /// A required field is empty.
    #[error("{0} must not be empty")]
    Empty(&'static str),
    /// A field is longer than allowed.
    #[error("{field} is {len} bytes long; at most {max} allowed")]
    TooLong {
        /// Field name.
        field: &'static str,
        /// Actual length.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// A field holds characters or a shape that is not allowed.
    #[error("{field} {value:?} is invalid: {why}")]
    Malformed {
        /// Field name.
        field: &'static str,
        /// Offending value (truncated).
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// A number is out of range.
    #[error("{field} {value} is out of range {min}..={max}")]
    OutOfRange {
        /// Field name.
        field: &'static str,
        /// Actual value.
        value: u64,
        /// Lowest allowed.
        min: u64,
        /// Highest allowed.
        max: u64,
    },
}

fn shorten(s: &str) -> String {
    s.chars().take(64).collect()
}

/// Checks a service name: one DNS label, 1-63 of `[a-z0-9-]`, starting and ending with a letter or digit.
pub fn service_name(name: &str) -> Result<(), InvalidInput> {
    if name.is_empty() {
        return Err(InvalidInput::Empty("service name"));
    }
    if name.len() > MAX_SERVICE_NAME {
        return Err(InvalidInput::TooLong {
            field: "service name",
            len: name.len(),
            max: MAX_SERVICE_NAME,
        });
    }
    // One DNS label: no dots, so never an IP literal (a Host header of
    // 169.254.169.254 names no service) nor a name outside the mesh.
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !name.chars().all(ok_char) || !edge_ok(name.chars().next()) || !edge_ok(name.chars().last())
    {
        return Err(InvalidInput::Malformed {
            field: "service name",
            value: shorten(name),
            why: "a DNS label: lowercase letters, digits and '-', starting and ending with a letter or digit",
        });
    }
    Ok(())
}

/// Refuses control characters: text shown to operators must not carry
/// terminal escape sequences.
fn printable(field: &'static str, s: &str) -> Result<(), InvalidInput> {
    if s.chars().any(char::is_control) {
        return Err(InvalidInput::Malformed {
            field,
            value: shorten(&s.escape_default().to_string()),
            why: "no control characters",
        });
    }
    Ok(())
}

/// Checks an instance id: 1-128 printable ASCII characters without spaces.
pub fn instance_id(id: &str) -> Result<(), InvalidInput> {
    if id.is_empty() {
        return Err(InvalidInput::Empty("instance id"));
    }
    if id.len() > MAX_INSTANCE_ID {
        return Err(InvalidInput::TooLong {
            field: "instance id",
            len: id.len(),
            max: MAX_INSTANCE_ID,
        });
    }
    if !id.chars().all(|c| c.is_ascii_graphic()) {
        return Err(InvalidInput::Malformed {
            field: "instance id",
            value: shorten(id),
            why: "use printable ASCII without spaces",
        });
    }
    Ok(())
}

/// Parses an endpoint IP address (names are not accepted: the registry stores what sidecars dial).
pub fn address(addr: &str) -> Result<IpAddr, InvalidInput> {
    if addr.is_empty() {
        return Err(InvalidInput::Empty("address"));
    }
    let ip: IpAddr = addr.parse().map_err(|_| InvalidInput::Malformed {
        field: "address",
        value: shorten(addr),
        why: "not an IPv4 or IPv6 address",
    })?;
    if ip.is_unspecified() || ip.is_multicast() {
        return Err(InvalidInput::Malformed {
            field: "address",
            value: shorten(addr),
            why: "unspecified and multicast addresses cannot be dialled",
        });
    }
    Ok(ip)
}

/// Checks a TCP port (1-65535) given as a protobuf `uint32`.
pub fn port(port: u32) -> Result<u16, InvalidInput> {
    match u16::try_from(port) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(InvalidInput::OutOfRange {
            field: "port",
            value: port.into(),
            min: 1,
            max: 65535,
        }),
    }
}

/// Validates a whole instance and fills defaults (weight, derived instance id).
pub fn instance(mut inst: Instance) -> Result<Instance, InvalidInput> {
    service_name(&inst.service)?;
    let ip = address(&inst.address)?;
    let port = port(inst.port)?;
    // Store the canonical text form so "::1" and "0:0::1" are one endpoint.
    inst.address = ip.to_string();
    if inst.instance_id.is_empty() {
        inst.instance_id = std::net::SocketAddr::new(ip, port).to_string();
    }
    instance_id(&inst.instance_id)?;
    if inst.weight == 0 {
        inst.weight = DEFAULT_WEIGHT;
    }
    if inst.weight > MAX_WEIGHT {
        return Err(InvalidInput::OutOfRange {
            field: "weight",
            value: inst.weight.into(),
            min: 1,
            max: MAX_WEIGHT.into(),
        });
    }
    if inst.zone.len() > MAX_LABEL_LEN {
        return Err(InvalidInput::TooLong {
            field: "zone",
            len: inst.zone.len(),
            max: MAX_LABEL_LEN,
        });
    }
    printable("zone", &inst.zone)?;
    if inst.labels.len() > MAX_LABELS {
        return Err(InvalidInput::OutOfRange {
            field: "labels",
            value: inst.labels.len() as u64,
            min: 0,
            max: MAX_LABELS as u64,
        });
    }
    for (k, v) in &inst.labels {
        label(k, v)?;
    }
    Ok(inst)
}

/// Checks one instance label: a non-empty key, both printable and at most
/// [`MAX_LABEL_LEN`] bytes.
pub fn label(key: &str, value: &str) -> Result<(), InvalidInput> {
    if key.is_empty() {
        return Err(InvalidInput::Empty("label key"));
    }
    for (field, s) in [("label key", key), ("label value", value)] {
        printable(field, s)?;
        if s.len() > MAX_LABEL_LEN {
            return Err(InvalidInput::TooLong {
                field,
                len: s.len(),
                max: MAX_LABEL_LEN,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_names() {
        for good in ["web", "api-v2", "a", "x1", "127"] {
            assert_eq!(service_name(good), Ok(()), "{good}");
        }
        let long = "a".repeat(64);
        for bad in [
            "",
            "Web",
            "-web",
            "web-",
            "we b",
            "wé",
            &long,
            "db.internal",
            "127.0.0.5",
            "169.254.169.254",
            "::1",
            "[::1]",
        ] {
            assert!(service_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn instances_get_defaults_and_canonical_addresses() {
        let inst = instance(Instance {
            service: "web".into(),
            address: "0:0::1".into(),
            port: 8080,
            ..Default::default()
        })
        .expect("valid");
        assert_eq!(inst.address, "::1");
        assert_eq!(inst.instance_id, "[::1]:8080");
        assert_eq!(inst.weight, DEFAULT_WEIGHT);
    }

    #[test]
    fn bad_instances_are_refused() {
        let base = Instance {
            service: "web".into(),
            address: "127.0.0.1".into(),
            port: 80,
            ..Default::default()
        };
        let cases = [
            Instance {
                port: 0,
                ..base.clone()
            },
            Instance {
                port: 70000,
                ..base.clone()
            },
            Instance {
                address: "web-1".into(),
                ..base.clone()
            },
            Instance {
                address: "0.0.0.0".into(),
                ..base.clone()
            },
            Instance {
                weight: 10_001,
                ..base.clone()
            },
            Instance {
                instance_id: "a b".into(),
                ..base.clone()
            },
            Instance {
                service: String::new(),
                ..base.clone()
            },
            Instance {
                zone: "a\u{1b}]0;owned\u{7}".into(),
                ..base.clone()
            },
            Instance {
                labels: [("v".to_string(), "\u{1b}[2J".to_string())].into(),
                ..base.clone()
            },
        ];
        for c in cases {
            assert!(instance(c.clone()).is_err(), "{c:?} accepted");
        }
    }
}
