//! Loading policy files and reporting errors at the file, line and field of the offending value.

use std::path::Path;

use thiserror::Error;

use super::model::PolicyFile;

/// A policy file could not be loaded.
#[derive(Debug, Error, PartialEq)]
#[error("{file}:{line}: field {field}: {message}")]
pub struct PolicyError {
    /// File (or source name) the policy came from.
    pub file: String,
    /// 1-based line of the offending value (0 when unknown).
    pub line: usize,
    /// Dotted path of the offending field, e.g. `services.web.retries.budget_ratio`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl PolicyFile {
    /// Parses and validates policy TOML; `file` names the source in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, PolicyError> {
        toml::from_str(text).map_err(|e| {
            let span = e.span();
            let (line, field) = match &span {
                Some(s) => locate(text, s.start),
                None => (0, String::from("(file)")),
            };
            PolicyError {
                file: file.to_string(),
                line,
                field,
                message: e.message().trim().to_string(),
            }
        })
    }

    /// Reads and parses a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            file: name.clone(),
            line: 0,
            field: "(file)".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&name, &text)
    }

    /// Renders the file back as TOML.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render policy: {e}\n"))
    }
}

/// Finds the 1-based line of byte `offset` and the dotted field path there:
/// the nearest `[table]` header above plus the key on the line, if any.
fn locate(text: &str, offset: usize) -> (usize, String) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let line = &text[line_start..line_end];
    let header_of = |l: &str| {
        let l = l.trim();
        l.starts_with('[').then(|| {
            l.trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim()
                .to_string()
        })
    };
    if let Some(h) = header_of(line) {
        return (line_no, h);
    }
    let table = text[..line_start]
        .lines()
        .rev()
        .find_map(header_of)
        .unwrap_or_default();
    let key = line
        .split_once('=')
        .map(|(k, _)| k.trim().trim_matches('"').to_string())
        .filter(|k| !k.is_empty() && !k.starts_with('#'));
    let field = match (table.is_empty(), key) {
        (true, Some(k)) => k,
        (false, Some(k)) => format!("{table}.{k}"),
        (_, None) => table,
    };
    (
        line_no,
        if field.is_empty() {
            "(file)".into()
        } else {
            field
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> PolicyError {
        PolicyFile::parse("p.toml", text).expect_err("must be refused")
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = error_of("[services.web.retries]\nmax_attempts = 3\nbudget_ratio = 1.5\n");
        assert_eq!(
            (e.line, e.field.as_str()),
            (3, "services.web.retries.budget_ratio")
        );
        assert!(
            e.to_string()
                .starts_with("p.toml:3: field services.web.retries.budget_ratio:"),
            "{e}"
        );

        let e = error_of("[services.web]\nbalancer = \"random\"\n");
        assert_eq!((e.line, e.field.as_str()), (2, "services.web.balancer"));

        let e = error_of("[services.web.timeouts]\nconect = \"1s\"\n");
        assert_eq!(
            (e.line, e.field.as_str()),
            (2, "services.web.timeouts.conect")
        );
        assert!(e.message.contains("unknown field"), "{e}");

        let e = error_of("[services.web.timeouts]\nconnect = \"1 sec\"\n");
        assert_eq!(e.line, 2);
        assert!(e.message.contains("not a duration"), "{e}");

        let e = error_of("[services.Web]\nbalancer = \"maglev\"\n");
        assert_eq!(e.line, 1);
        assert!(e.message.contains("service name"), "{e}");

        let e = error_of("[services.web.retries]\nmax_attempts = 0\n");
        assert_eq!(
            (e.line, e.field.as_str()),
            (2, "services.web.retries.max_attempts")
        );

        let e = error_of("[services.web]\nbalancer = \n");
        assert_eq!(e.line, 2);
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_text_never_panics(text in ".{0,200}") {
            let _ = PolicyFile::parse("fuzz", &text);
        }
    }
}

#[cfg(test)]
mod shipped {
    #[test]
    fn the_lab_policy_file_is_valid() {
        let text = include_str!("../../../deploy/policy.toml");
        let file =
            super::PolicyFile::parse("deploy/policy.toml", text).expect("shipped policy parses");
        assert_eq!(file.services.len(), 2);
    }
}
