//! docker-compose 1.x reads YAML 1.1 (PyYAML), our emitter writes YAML 1.2:
//! a string 1.2 leaves plain may mean something else to 1.1 — `no` and
//! `on` are booleans there, `22:22` the number 1342 (base 60), `0777`
//! octal, `2026-11-30` a date. Such strings are written quoted.

use std::sync::LazyLock;

use regex::Regex;
use serde_yaml_ng::Value;

/// PyYAML's implicit resolvers (resolver.py) for bool, float, int, merge,
/// null, timestamp and value: a plain scalar matching one is not a string.
static NOT_A_STRING: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(concat!(
        r"^(?:",
        r"yes|Yes|YES|no|No|NO|true|True|TRUE|false|False|FALSE|on|On|ON|off|Off|OFF",
        r"|[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?",
        r"|[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)",
        r"|[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+",
        r"|[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+",
        r"|<<|~|null|Null|NULL|=|",
        r"|[0-9]{4}-[0-9]{2}-[0-9]{2}",
        r"|[0-9]{4}-[0-9]{1,2}-[0-9]{1,2}(?:[Tt]|[ \t]+)[0-9]{1,2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]*)?(?:[ \t]*(?:Z|[-+][0-9]{1,2}(?::[0-9]{2})?))?",
        r")$"
    ))
    .expect("the YAML 1.1 patterns compile")
});

/// A character no compose file holds, which makes the emitter quote a
/// string (as `"\x01…"`); taken out of the text afterwards.
const MARK: char = '\u{1}';

/// `value` as YAML that YAML 1.1 and 1.2 readers both read back as it is.
pub fn to_string(value: &Value) -> Result<String, serde_yaml_ng::Error> {
    let mut marked = value.clone();
    mark(&mut marked);
    Ok(serde_yaml_ng::to_string(&marked)?.replace("\"\\x01", "\""))
}

fn mark(v: &mut Value) {
    match v {
        Value::String(s) if NOT_A_STRING.is_match(s) => s.insert(0, MARK),
        Value::Sequence(items) => items.iter_mut().for_each(mark),
        Value::Mapping(m) => {
            *m = std::mem::take(m)
                .into_iter()
                .map(|(mut k, mut v)| {
                    mark(&mut k);
                    mark(&mut v);
                    (k, v)
                })
                .collect();
        }
        Value::Tagged(t) => mark(&mut t.value),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_yaml_1_1_would_retype_are_quoted_and_others_left_plain() {
        let v: Value = serde_yaml_ng::from_str(
            "{restart: 'no', ports: ['22:22', '8080:80'], mode: '0777', day: '2026-11-30', \
              flag: 'on', name: web, retries: 120, path: /healthz, tls: true, labels: {'on': x}}",
        )
        .expect("yaml");
        let text = to_string(&v).expect("emit");
        for quoted in [
            "restart: \"no\"",
            "- \"22:22\"",
            "mode: \"0777\"",
            "day: \"2026-11-30\"",
            "flag: \"on\"",
            "\"on\": x",
        ] {
            assert!(text.contains(quoted), "{quoted} in\n{text}");
        }
        for plain in [
            "- 8080:80",
            "name: web",
            "retries: 120",
            "path: /healthz",
            "tls: true",
        ] {
            assert!(text.contains(plain), "{plain} in\n{text}");
        }
        assert!(!text.contains('\u{1}') && !text.contains("\\x01"), "{text}");
        // And it reads back the same.
        assert_eq!(serde_yaml_ng::from_str::<Value>(&text).expect("back"), v);
    }
}
