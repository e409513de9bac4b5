//! Reading a binary's TOML config file, with one-line errors that name the file, the line and the key.
//!
//! The binaries own their `Config` types (with `#[serde(deny_unknown_fields)]`); this module only
//! turns a file into one and a failure into a message an operator can act on.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Why a config file could not be used. Its `Display` is one line and names the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not read the config file {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {}{}: {message}", path.display(), Where(*line, key.as_deref()))]
    Invalid {
        path: PathBuf,
        /// 1-based line of the offending text, when known.
        line: Option<usize>,
        /// The key on that line, when the message does not already name it.
        key: Option<String>,
        message: String,
    },
}

struct Where<'a>(Option<usize>, Option<&'a str>);

impl std::fmt::Display for Where<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(line) = self.0 {
            write!(f, ", line {line}")?;
        }
        if let Some(key) = self.1 {
            write!(f, ", key `{key}`")?;
        }
        Ok(())
    }
}

/// Loads `explicit` if given (it must exist), else `packaged` if it exists, else `T::default()`.
/// Returns the config and the file it came from.
pub fn load_config<T: DeserializeOwned + Default>(
    explicit: Option<&Path>,
    packaged: &Path,
) -> Result<(T, Option<PathBuf>), ConfigError> {
    let path = explicit.unwrap_or(packaged);
    match load_toml(path) {
        Ok(config) => Ok((config, Some(path.to_owned()))),
        Err(ConfigError::Read { source, .. })
            if explicit.is_none() && source.kind() == std::io::ErrorKind::NotFound =>
        {
            Ok((T::default(), None))
        }
        Err(e) => Err(e),
    }
}

/// Reads and parses the TOML file at `path`.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_toml(path, &text)
}

/// Parses `text`, the contents of the file at `path` (named in errors).
pub fn parse_toml<T: DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let message = e.message().trim().replace('\n', " ");
        let (line, key) = match e.span() {
            Some(span) => {
                let start = span.start.min(text.len());
                let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
                let line_text = text[line_start..].lines().next().unwrap_or("");
                let key = key_of(line_text).filter(|k| !message.contains(&format!("`{k}`")));
                (Some(text[..start].matches('\n').count() + 1), key)
            }
            None => (None, None),
        };
        ConfigError::Invalid {
            path: path.to_owned(),
            line,
            key,
            message,
        }
    })
}

/// The bare key of a `key = value` line, if the line is one.
fn key_of(line: &str) -> Option<String> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    bare.then(|| key.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        name: Option<String>,
        port: Option<u16>,
    }

    fn err(text: &str) -> String {
        parse_toml::<Sample>(Path::new("/etc/x.toml"), text)
            .expect_err("must fail")
            .to_string()
    }

    #[test]
    fn a_good_file_parses_and_an_empty_one_is_all_defaults() {
        let s: Sample = parse_toml(Path::new("x"), "# hi\nname = \"a\"\nport = 7\n").expect("ok");
        assert_eq!(
            s,
            Sample {
                name: Some("a".into()),
                port: Some(7)
            }
        );
        let s: Sample = parse_toml(Path::new("x"), "").expect("empty");
        assert_eq!(s, Sample::default());
    }

    #[test]
    fn errors_are_one_line_naming_file_line_and_key() {
        let e = err("name = \"a\"\n\nnmae = \"b\"\n");
        assert!(
            e.starts_with("config file /etc/x.toml, line 3: unknown field `nmae`"),
            "{e}"
        );
        let e = err("# comment\nport = \"seven\"\n");
        assert!(
            e.starts_with("config file /etc/x.toml, line 2, key `port`: invalid type"),
            "{e}"
        );
        let e = err("port = 70000\n");
        assert!(e.contains("line 1, key `port`"), "{e}");
        let e = err("name = \n");
        assert!(e.starts_with("config file /etc/x.toml, line 1"), "{e}");
        for text in ["nmae = 1", "port = \"x\"", "[table]\nx = 1", "name = "] {
            assert!(!err(text).contains('\n'), "{text}: {}", err(text));
        }
    }

    #[test]
    fn the_packaged_file_is_optional_and_an_explicit_one_is_not() {
        let dir = std::env::temp_dir().join(format!("de-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let missing = dir.join("missing.toml");
        let (s, from) = load_config::<Sample>(None, &missing).expect("absent packaged file");
        assert_eq!((s, from), (Sample::default(), None));
        let e = load_config::<Sample>(Some(&missing), &missing).expect_err("explicit");
        assert!(e.to_string().contains("missing.toml"), "{e}");
        let present = dir.join("present.toml");
        std::fs::write(&present, "port = 9\n").expect("write");
        let (s, from) = load_config::<Sample>(None, &present).expect("packaged file");
        assert_eq!((s.port, from), (Some(9), Some(present.clone())));
        std::fs::write(&present, "prot = 9\n").expect("write");
        let e = load_config::<Sample>(None, &present).expect_err("bad packaged file");
        assert!(e.to_string().contains("unknown field `prot`"), "{e}");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_missing_file_is_a_read_error_naming_it() {
        let e = load_toml::<Sample>(Path::new("/nonexistent/de.toml")).expect_err("missing");
        assert!(matches!(e, ConfigError::Read { .. }));
        assert_eq!(
            e.to_string(),
            "could not read the config file /nonexistent/de.toml"
        );
    }
}
