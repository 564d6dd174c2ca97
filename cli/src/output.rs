//! Tables for people, JSON for scripts.

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde::Serialize;

/// Output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned tables.
    Table,
    /// JSON.
    Json,
}

/// An endpoint as JSON: the shared view and the instance's labels.
#[derive(Serialize)]
pub struct EndpointJson {
    #[serde(flatten)]
    view: wayfinder_proto::view::EndpointView,
    labels: std::collections::BTreeMap<String, String>,
}

impl From<&wayfinder_proto::v1::Endpoint> for EndpointJson {
    fn from(e: &wayfinder_proto::v1::Endpoint) -> Self {
        Self {
            view: e.into(),
            labels: labels(e),
        }
    }
}

/// An endpoint's labels, sorted.
pub fn labels(e: &wayfinder_proto::v1::Endpoint) -> std::collections::BTreeMap<String, String> {
    e.instance
        .as_ref()
        .map(|i| i.labels.clone().into_iter().collect())
        .unwrap_or_default()
}

/// Labels as `k=v,k=v`, `-` without any.
pub fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// A table with a header row.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

/// `text` safe for a terminal: control characters (an escape sequence
/// stored in an instance's zone or label would otherwise drive the
/// operator's terminal) are shown as `\u{..}`; line breaks stay.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\n') {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(
        text.chars()
            .map(|c| {
                if c.is_control() && c != '\n' {
                    c.escape_unicode().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
    )
}

/// Prints a line for people (see [`printable`]).
pub fn line(text: &str) {
    println!("{}", printable(text));
}

/// Prints `value` as one line of JSON.
pub fn json(value: &impl Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string(value)?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(printable("web-1 │ zone-a\n"), "web-1 │ zone-a\n");
        let shown = printable("zone\u{1b}]0;owned\u{7}\u{1b}[2J");
        assert!(!shown.chars().any(|c| c.is_control()), "{shown}");
        assert!(shown.contains("\\u{1b}"), "{shown}");
    }
}
