//! The logger: `RUST_LOG`'s filter, with the HTTP and WebSocket crates kept
//! quiet unless named, and the line format (`--log-format`): text for people,
//! or JSON, one object per line, for log shippers.
//!
//! Both formats print a record's structured key-values (the connection lines
//! of `core::connlog`): as ` key=value` after the message, or as fields of the
//! JSON object.

use std::fmt::Display;
use std::io::{self, Write};

use log::kv::{self, Key, Value, VisitSource, VisitValue};
use log::{LevelFilter, Record};
use pretty_env_logger::env_logger;

/// `--log-format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `2026-12-02T01:00:00.000Z INFO  portal_sync::conn > connection opened conn=… user=…`
    #[default]
    Text,
    /// `{"ts":"…","level":"INFO","target":"…","msg":"…",<fields>}` per line
    Json,
}

/// Crates whose debug output is frame and connection dumps, and the most
/// they log unless `RUST_LOG` names them: a bare `RUST_LOG=debug` is for our
/// own code.
const QUIET: &[(&str, LevelFilter)] = &[
    ("tungstenite", LevelFilter::Warn),
    ("tokio_tungstenite", LevelFilter::Warn),
    ("hyper", LevelFilter::Warn),
    ("hyper_util", LevelFilter::Warn),
    ("warp", LevelFilter::Info),
];

/// Installs the logger for the process.
pub fn init(format: LogFormat) {
    let spec = filter(std::env::var("RUST_LOG").ok().as_deref());
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(&spec);
    match format {
        LogFormat::Text => builder.format(|buf, record| {
            let level = buf.default_styled_level(record.level());
            let ts = buf.timestamp_millis();
            text_line(buf, &ts, &level, record)
        }),
        LogFormat::Json => builder.format(|buf, record| {
            let ts = buf.timestamp_millis();
            json_line(buf, &ts, record)
        }),
    };
    // Another logger already installed (an embedder's, a test's) stays.
    let _ = builder.try_init();
}

/// The filter for `RUST_LOG` (unset: `info`): as given, plus each crate of
/// [`QUIET`] that it does not name, capped at its level (or lower, when the
/// default level is lower). Without a default level (`portal_sync=debug`)
/// nothing else logs anyway.
pub fn filter(rust_log: Option<&str>) -> String {
    let rust_log = rust_log.map(str::trim).filter(|s| !s.is_empty());
    let given = rust_log.unwrap_or("info");
    let (directives, regex) = match given.split_once('/') {
        Some((d, r)) => (d, Some(r)),
        None => (given, None),
    };
    let mut default = None;
    let mut named = Vec::new();
    for directive in directives.split(',').map(str::trim) {
        match directive.split_once('=') {
            Some((name, _)) => named.push(name.trim()),
            None => match directive.parse::<LevelFilter>() {
                Ok(level) => default = Some(level),
                Err(_) if !directive.is_empty() => named.push(directive),
                Err(_) => {}
            },
        }
    }
    let mut spec = directives.to_string();
    if let Some(default) = default {
        for (name, cap) in QUIET {
            if !named.contains(name) {
                spec.push_str(&format!(",{name}={}", default.min(*cap)));
            }
        }
    }
    if let Some(regex) = regex {
        spec.push('/');
        spec.push_str(regex);
    }
    spec
}

/// ` {ts} {LEVEL} {target} > {msg} key=value…`, as pretty_env_logger lays
/// it out; a value with spaces, quotes, `=` or control characters (a peer's
/// close reason) is quoted and escaped, so a line stays one line.
fn text_line(
    out: &mut impl Write,
    ts: &dyn Display,
    level: &dyn Display,
    record: &Record<'_>,
) -> io::Result<()> {
    write!(
        out,
        " {ts} {level:<5} {} > {}",
        record.target(),
        record.args()
    )?;
    each_field(record, |key, field| match field {
        Field::Null => Ok(()),
        Field::Raw(v) => write!(out, " {key}={v}"),
        Field::Text(v) if needs_quotes(&v) => write!(out, " {key}={v:?}"),
        Field::Text(v) => write!(out, " {key}={v}"),
    })?;
    writeln!(out)
}

fn needs_quotes(v: &str) -> bool {
    v.is_empty()
        || v.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=')
}

/// One JSON object on one line: `ts`, `level`, `target`, `msg`, then the
/// record's fields (numbers as numbers, a missing value as `null`).
fn json_line(out: &mut impl Write, ts: &dyn Display, record: &Record<'_>) -> io::Result<()> {
    write!(
        out,
        "{{\"ts\":\"{ts}\",\"level\":\"{}\",\"target\":",
        record.level()
    )?;
    json_string(out, record.target())?;
    out.write_all(b",\"msg\":")?;
    match record.args().as_str() {
        Some(msg) => json_string(out, msg)?,
        None => json_string(out, &record.args().to_string())?,
    }
    each_field(record, |key, field| {
        out.write_all(b",")?;
        json_string(out, key)?;
        out.write_all(b":")?;
        match field {
            Field::Null => out.write_all(b"null"),
            Field::Raw(v) => out.write_all(v.as_bytes()),
            Field::Text(v) => json_string(out, &v),
        }
    })?;
    writeln!(out, "}}")
}

fn json_string(out: &mut impl Write, s: &str) -> io::Result<()> {
    serde_json::to_writer(&mut *out, s).map_err(io::Error::other)
}

/// A key-value's value as the formats print it.
enum Field<'v> {
    Null,
    /// A number or a boolean: the same text in both formats, unquoted.
    Raw(String),
    Text(std::borrow::Cow<'v, str>),
}

/// Calls `write` with each of the record's key-values, in order.
fn each_field(
    record: &Record<'_>,
    write: impl FnMut(&str, Field<'_>) -> io::Result<()>,
) -> io::Result<()> {
    struct Each<F> {
        write: F,
        failed: Option<io::Error>,
    }
    impl<'kvs, F: FnMut(&str, Field<'_>) -> io::Result<()>> VisitSource<'kvs> for Each<F> {
        fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
            let mut field = None;
            value.visit(ToField(&mut field))?;
            let field = field.unwrap_or_else(|| Field::Text(value.to_string().into()));
            (self.write)(key.as_str(), field).map_err(|e| {
                self.failed = Some(e);
                kv::Error::msg("writing a log line failed")
            })
        }
    }
    let mut each = Each {
        write,
        failed: None,
    };
    let _ = record.key_values().visit(&mut each);
    each.failed.map_or(Ok(()), Err)
}

struct ToField<'a, 'v>(&'a mut Option<Field<'v>>);

impl<'v> VisitValue<'v> for ToField<'_, 'v> {
    fn visit_any(&mut self, value: Value<'_>) -> Result<(), kv::Error> {
        *self.0 = Some(Field::Text(value.to_string().into()));
        Ok(())
    }
    fn visit_null(&mut self) -> Result<(), kv::Error> {
        *self.0 = Some(Field::Null);
        Ok(())
    }
    fn visit_u64(&mut self, value: u64) -> Result<(), kv::Error> {
        *self.0 = Some(Field::Raw(value.to_string()));
        Ok(())
    }
    fn visit_i64(&mut self, value: i64) -> Result<(), kv::Error> {
        *self.0 = Some(Field::Raw(value.to_string()));
        Ok(())
    }
    fn visit_f64(&mut self, value: f64) -> Result<(), kv::Error> {
        // JSON has no NaN or infinity.
        *self.0 = Some(if value.is_finite() {
            Field::Raw(value.to_string())
        } else {
            Field::Text(value.to_string().into())
        });
        Ok(())
    }
    fn visit_bool(&mut self, value: bool) -> Result<(), kv::Error> {
        *self.0 = Some(Field::Raw(value.to_string()));
        Ok(())
    }
    fn visit_str(&mut self, value: &str) -> Result<(), kv::Error> {
        *self.0 = Some(Field::Text(value.to_string().into()));
        Ok(())
    }
    fn visit_borrowed_str(&mut self, value: &'v str) -> Result<(), kv::Error> {
        *self.0 = Some(Field::Text(value.into()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_level_keeps_the_frame_dumping_crates_quiet() {
        assert_eq!(
            filter(None),
            "info,tungstenite=WARN,tokio_tungstenite=WARN,hyper=WARN,hyper_util=WARN,warp=INFO"
        );
        assert_eq!(
            filter(Some("debug")),
            "debug,tungstenite=WARN,tokio_tungstenite=WARN,hyper=WARN,hyper_util=WARN,warp=INFO"
        );
        // Never louder than the default level.
        assert_eq!(
            filter(Some("error")),
            "error,tungstenite=ERROR,tokio_tungstenite=ERROR,hyper=ERROR,hyper_util=ERROR,warp=ERROR"
        );
    }

    #[test]
    fn crates_named_in_rust_log_keep_their_level() {
        assert_eq!(
            filter(Some("trace,tungstenite=trace,hyper")),
            "trace,tungstenite=trace,hyper,tokio_tungstenite=WARN,hyper_util=WARN,warp=INFO"
        );
        assert_eq!(
            filter(Some("info,portal_sync::conn=off")),
            "info,portal_sync::conn=off,tungstenite=WARN,tokio_tungstenite=WARN,hyper=WARN,hyper_util=WARN,warp=INFO"
        );
        // No default level: nothing else logs; the regex stays last.
        assert_eq!(filter(Some("portal_sync=debug")), "portal_sync=debug");
        assert_eq!(
            filter(Some("warn/conn")),
            "warn,tungstenite=WARN,tokio_tungstenite=WARN,hyper=WARN,hyper_util=WARN,warp=WARN/conn"
        );
    }

    fn render(json: bool, record: &Record<'_>) -> String {
        let mut out = Vec::new();
        if json {
            json_line(&mut out, &"2026-12-02T01:00:00.000Z", record).expect("write");
        } else {
            text_line(&mut out, &"2026-12-02T01:00:00.000Z", &"INFO", record).expect("write");
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn json_lines_carry_the_fields_with_their_types() {
        let kvs: &[(&str, Value<'_>)] = &[
            ("conn", Value::from("c1")),
            ("code", Value::from(1008u16)),
            ("reason", Value::from("token \"expired\"\n")),
            ("user", Value::null()),
        ];
        let record = Record::builder()
            .args(format_args!("connection closed"))
            .level(log::Level::Info)
            .target("portal_sync::conn")
            .key_values(&kvs)
            .build();
        let line = render(true, &record);
        assert!(
            line.ends_with("}\n") && line.matches('\n').count() == 1,
            "{line}"
        );
        let parsed: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
        assert_eq!(
            parsed,
            serde_json::json!({
                "ts": "2026-12-02T01:00:00.000Z", "level": "INFO",
                "target": "portal_sync::conn", "msg": "connection closed",
                "conn": "c1", "code": 1008, "reason": "token \"expired\"\n", "user": null
            })
        );
        assert_eq!(
            render(false, &record),
            " 2026-12-02T01:00:00.000Z INFO  portal_sync::conn > connection closed conn=c1 \
             code=1008 reason=\"token \\\"expired\\\"\\n\"\n"
        );
    }
}
