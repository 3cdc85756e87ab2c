//! The config file (`--config portal-sync.toml`, `PORTAL_CONFIG`): its keys
//! are `serve`'s flags without `--`, checked against the flags' own clap
//! definitions, so a flag added to `serve` is a key at once and a value is
//! checked as the flag's would be. Precedence: flag > environment > file >
//! default. Also `config check`, `config print` (secrets redacted) and
//! `config init`.

use std::any::TypeId;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::config::redact_url;
use clap::builder::Resettable;
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, Command};
use toml::{Table, Value};

/// Arguments that are not settings: no key in the file.
fn is_setting(arg: &clap::Arg) -> bool {
    let id = arg.get_id().as_str();
    !(id == "help" || id == "version" || id == "config") && arg.get_long().is_some()
}

/// Keys whose values are secrets: never printed.
const SECRET_KEYS: [&str; 1] = ["jwt-secret"];
/// Keys that may hold a URL with a password (`redis://:pw@host`).
const URL_KEYS: [&str; 2] = ["db", "redis-url"];

pub(super) fn read(path: &Path) -> Result<Table, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => format!("the config file {shown} does not exist"),
        _ => format!("cannot read the config file {shown}: {e}"),
    })?;
    text.parse::<Table>()
        .map_err(|e| format!("{shown}: {}", e.to_string().trim_end()))
}

/// A file holding `jwt-secret` that others may read: anyone who can read it
/// can sign tokens for every user.
pub(super) fn readable_secret(path: &Path, table: &Table) -> Option<String> {
    if !SECRET_KEYS.iter().any(|k| table.contains_key(*k)) {
        return None;
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o077 != 0 {
            return Some(format!(
                "the config file {} holds jwt-secret and is readable by others \
                 (mode {:o}): chmod 600 it, or use jwt-secret-file",
                path.display(),
                mode & 0o777
            ));
        }
    }
    None
}

/// What a flag's value parser takes, as a TOML type.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Integer,
    Number,
    Text,
    Boolean,
    /// A parser this file does not know (a custom one): text or integer,
    /// the parser decides.
    Any,
}

fn kind_of(arg: &clap::Arg) -> Kind {
    if matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
        return Kind::Boolean;
    }
    let parser = arg.get_value_parser();
    let id = parser.type_id();
    let is = |t: TypeId| id == t;
    if [
        TypeId::of::<u8>(),
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
        TypeId::of::<usize>(),
        TypeId::of::<i32>(),
        TypeId::of::<i64>(),
    ]
    .into_iter()
    .any(is)
    {
        Kind::Integer
    } else if is(TypeId::of::<f64>()) {
        Kind::Number
    } else if is(TypeId::of::<String>())
        || is(TypeId::of::<PathBuf>())
        || is(TypeId::of::<OsString>())
        || !arg.get_possible_values().is_empty()
    {
        Kind::Text
    } else {
        Kind::Any
    }
}

fn expected(kind: Kind, arg: &clap::Arg) -> String {
    match kind {
        Kind::Integer => "an integer".into(),
        Kind::Number => "a number".into(),
        Kind::Boolean => "a boolean (true or false)".into(),
        Kind::Text => {
            let names: Vec<String> = arg
                .get_possible_values()
                .iter()
                .map(|v| format!("\"{}\"", v.get_name()))
                .collect();
            if names.is_empty() {
                "a string".into()
            } else {
                format!("one of {}", names.join(", "))
            }
        }
        Kind::Any => "a string or an integer".into(),
    }
}

/// One TOML value as the flag's text, if its type fits.
fn scalar(kind: Kind, value: &Value) -> Option<String> {
    match (kind, value) {
        (Kind::Integer | Kind::Number | Kind::Any, Value::Integer(n)) => Some(n.to_string()),
        (Kind::Number, Value::Float(x)) => Some(x.to_string()),
        (Kind::Text | Kind::Any, Value::String(s)) => Some(s.clone()),
        (Kind::Boolean, Value::Boolean(b)) => Some(b.to_string()),
        _ => None,
    }
}

/// The file's values as the flags' texts, each checked by the flag's parser.
fn values(arg: &clap::Arg, key: &str, value: &Value) -> Result<Vec<String>, String> {
    let kind = kind_of(arg);
    let many = matches!(arg.get_action(), ArgAction::Append);
    let texts = match value {
        Value::Array(items) if many => items
            .iter()
            .map(|item| scalar(kind, item))
            .collect::<Option<Vec<_>>>(),
        single => scalar(kind, single).map(|t| vec![t]),
    };
    let texts = texts.ok_or_else(|| {
        let expected = expected(kind, arg);
        let expected = if many {
            format!("{expected} or an array of them")
        } else {
            expected
        };
        let found = match value {
            Value::Array(items) => match items.iter().find(|i| scalar(kind, i).is_none()) {
                Some(item) => format!(
                    "an array holding {} {}",
                    article(item.type_str()),
                    item.type_str()
                ),
                None => "an array".into(),
            },
            other => format!("{} {}", article(other.type_str()), other.type_str()),
        };
        format!("`{key}` must be {expected}, not {found}")
    })?;
    if kind == Kind::Boolean {
        return Ok(texts);
    }
    for text in &texts {
        parses(arg, key, text).map_err(|e| {
            if arg.get_possible_values().is_empty() {
                format!("`{key}`: {e}")
            } else {
                format!("`{key}`: {e}: expected {}", expected(kind, arg))
            }
        })?;
    }
    Ok(texts)
}

/// Runs the flag's own parser (ranges, enums, custom parsers) on a value,
/// on a copy of the flag alone: no environment, no conflicts.
fn parses(arg: &clap::Arg, key: &str, text: &str) -> Result<(), String> {
    let lone = arg
        .clone()
        .env(None)
        .conflicts_with(Resettable::Reset)
        .requires(Resettable::Reset)
        .global(false)
        .required(false);
    Command::new("portal-sync")
        .no_binary_name(true)
        .arg(lone)
        .try_get_matches_from([format!("--{key}={text}")])
        .map(|_| ())
        .map_err(|e| clap_reason(&e))
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// clap's message without its `error: ` and the usage lines after it.
fn clap_reason(e: &clap::Error) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or_default();
    first.strip_prefix("error: ").unwrap_or(first).to_string()
}

/// Whether the setting was given by flag or environment (they win over the
/// file), itself or through a flag it conflicts with (the secret's two).
fn given_elsewhere(cmd: &Command, matches: &ArgMatches, arg: &clap::Arg) -> bool {
    let given = |id: &str| {
        matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let conflict = |a: &clap::Arg, b: &clap::Arg| {
        cmd.get_arg_conflicts_with(a)
            .iter()
            .any(|c| c.get_id() == b.get_id())
    };
    given(arg.get_id().as_str())
        || cmd
            .get_arguments()
            .filter(|other| conflict(arg, other) || conflict(other, arg))
            .any(|other| given(other.get_id().as_str()))
}

/// Checks every key of `table` against `cmd`'s flags (unknown keys and
/// wrong types are errors naming the key).
pub(super) fn check(cmd: &Command, table: &Table) -> Result<(), String> {
    for (key, value) in table {
        let arg = setting(cmd, key)?;
        values(arg, key, value)?;
    }
    Ok(())
}

fn setting<'c>(cmd: &'c Command, key: &str) -> Result<&'c clap::Arg, String> {
    cmd.get_arguments()
        .find(|a| is_setting(a) && a.get_long() == Some(key))
        .ok_or_else(|| {
            format!(
                "unknown key `{key}` (keys are `portal-sync serve`'s flags without --; \
                 `portal-sync config init` writes them all)"
            )
        })
}

/// The file's settings as flags to append to the command line, leaving out
/// those given by flag or environment; and the keys that were used.
pub(super) fn as_args(
    cmd: &Command,
    matches: &ArgMatches,
    table: &Table,
) -> Result<(Vec<OsString>, Vec<String>), String> {
    let mut args = Vec::new();
    let mut used = Vec::new();
    for (key, value) in table {
        let arg = setting(cmd, key)?;
        let texts = values(arg, key, value)?;
        if given_elsewhere(cmd, matches, arg) {
            continue;
        }
        used.push(key.clone());
        for text in texts {
            match arg.get_action() {
                ArgAction::SetTrue if text == "true" => args.push(format!("--{key}").into()),
                ArgAction::SetFalse if text == "false" => args.push(format!("--{key}").into()),
                ArgAction::SetTrue | ArgAction::SetFalse => {}
                // `--key=value`: a value may start with `-`.
                _ => args.push(format!("--{key}={text}").into()),
            }
        }
    }
    Ok((args, used))
}

fn toml_value(kind: Kind, text: &str) -> Value {
    match kind {
        Kind::Integer => text
            .parse::<i64>()
            .map(Value::Integer)
            .unwrap_or_else(|_| Value::String(text.into())),
        Kind::Number => text
            .parse::<f64>()
            .map(Value::Float)
            .unwrap_or_else(|_| Value::String(text.into())),
        Kind::Boolean => Value::Boolean(text == "true"),
        Kind::Text | Kind::Any => Value::String(text.into()),
    }
}

/// `config print`: every setting of `cmd` as it would take effect, as TOML
/// (so it can be a config file), with where each came from; secrets are `***`.
pub(super) fn print(cmd: &Command, matches: &ArgMatches, from_file: &[String]) -> String {
    let mut out = String::from("# effective settings (flag > environment > file > default)\n");
    for arg in cmd.get_arguments().filter(|a| is_setting(a)) {
        let Some(key) = arg.get_long() else { continue };
        let id = arg.get_id().as_str();
        let source = if from_file.iter().any(|k| k == key) {
            "file".to_string()
        } else {
            match matches.value_source(id) {
                Some(ValueSource::CommandLine) => "flag".into(),
                Some(ValueSource::EnvVariable) => match arg.get_env() {
                    Some(env) => format!("environment {}", env.to_string_lossy()),
                    None => "environment".into(),
                },
                Some(ValueSource::DefaultValue) => "default".into(),
                _ => "not set".into(),
            }
        };
        let kind = kind_of(arg);
        let raw: Vec<String> = matches
            .get_raw(id)
            .map(|values| values.map(|v| v.to_string_lossy().into_owned()).collect())
            .unwrap_or_default();
        let raw: Vec<String> = if SECRET_KEYS.contains(&key) {
            raw.iter().map(|_| "***".to_string()).collect()
        } else if URL_KEYS.contains(&key) {
            raw.iter().map(|v| redact_url(v)).collect()
        } else {
            raw
        };
        let value = match (arg.get_action(), raw.as_slice()) {
            (_, []) if source == "not set" => None,
            (ArgAction::Append, values) => Some(Value::Array(
                values.iter().map(|v| toml_value(kind, v)).collect(),
            )),
            (_, [one, ..]) => Some(toml_value(kind, one)),
            (_, []) => None,
        };
        match value {
            Some(value) => out.push_str(&format!("{key} = {value}  # {source}\n")),
            None => out.push_str(&format!("# {key} =  (not set)\n")),
        }
    }
    out
}

/// `config init`: every setting with its help and default, commented out.
pub(super) fn template(cmd: &Command) -> String {
    let mut out = String::from(
        "# portal-sync config file: `portal-sync serve --config FILE` (or PORTAL_CONFIG=FILE).\n\
         # Keys are serve's flags without --; flags and environment variables win over\n\
         # this file. Uncomment what you change. `portal-sync config check FILE` checks it.\n",
    );
    for arg in cmd.get_arguments().filter(|a| is_setting(a)) {
        let Some(key) = arg.get_long() else { continue };
        out.push('\n');
        if let Some(help) = arg.get_long_help().or(arg.get_help()) {
            for line in help.to_string().lines() {
                out.push_str(&format!("# {}\n", line.trim_end()).replace("# \n", "#\n"));
            }
        }
        let kind = kind_of(arg);
        let defaults: Vec<Value> = arg
            .get_default_values()
            .iter()
            .map(|v| toml_value(kind, &v.to_string_lossy()))
            .collect();
        let example = match (arg.get_action(), defaults.as_slice()) {
            (ArgAction::Append, d) => Value::Array(d.to_vec()).to_string(),
            (_, [one, ..]) => one.to_string(),
            (ArgAction::SetTrue, []) => "false".into(),
            (_, []) => format!("<{}>  (not set by default)", expected(kind, arg)),
        };
        out.push_str(&format!("# {key} = {example}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_in_urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db.example:5432/portal"),
            "postgres://app:***@db.example:5432/portal"
        );
        assert_eq!(
            redact_url("redis://:pw@127.0.0.1:6379"),
            "redis://:***@127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url("postgres://app@host/db"),
            "postgres://app@host/db"
        );
        assert_eq!(redact_url("portal-sync.db"), "portal-sync.db");
        // An `@` in the path is not a user.
        assert_eq!(redact_url("redis://host/a@b"), "redis://host/a@b");
    }
}
