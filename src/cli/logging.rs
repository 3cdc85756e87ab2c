//! The logger: `RUST_LOG`'s filter, with the HTTP and WebSocket crates kept
//! quiet unless named, and the line format (`--log-format`): text for people,
//! or JSON, one object per line, for log shippers.
//!
//! Both formats print a record's structured key-values (the connection lines
//! of `core::connlog`): as ` key=value` after the message, or as fields of the
//! JSON object.

use std::io::{self, Write};
use std::time::{SystemTime, UNIX_EPOCH};

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
///
/// A line is built in a reused buffer and written at once, without
/// `fmt`'s machinery for the common parts: at `info` a busy server writes two
/// connection lines per connection (BENCHMARKS.md, "Connection logs").
pub fn init(format: LogFormat) {
    let spec = filter(std::env::var("RUST_LOG").ok().as_deref());
    let mut builder = env_logger::Builder::new();
    builder.parse_filters(&spec);
    // Colours only on a terminal, where the cost of styling does not matter.
    let styled = std::io::IsTerminal::is_terminal(&std::io::stderr());
    builder.format(move |buf, record| {
        LINE.with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            let now = std::time::SystemTime::now();
            match format {
                LogFormat::Json => json_line(&mut line, now, record)?,
                LogFormat::Text if styled => {
                    let level = buf.default_styled_level(record.level()).to_string();
                    text_line(&mut line, now, &level, record)?
                }
                LogFormat::Text => text_line(&mut line, now, level_padded(record), record)?,
            }
            buf.write_all(&line)
        })
    });
    // Another logger already installed (an embedder's, a test's) stays.
    let _ = builder.try_init();
}

thread_local! {
    static LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn level_padded(record: &Record<'_>) -> &'static str {
    match record.level() {
        log::Level::Error => "ERROR",
        log::Level::Warn => "WARN ",
        log::Level::Info => "INFO ",
        log::Level::Debug => "DEBUG",
        log::Level::Trace => "TRACE",
    }
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
/// it out; a value with spaces, quotes, `=`, control or non-ASCII characters
/// (a peer's close reason) is quoted and escaped, so a line stays one line.
fn text_line(
    line: &mut Vec<u8>,
    now: SystemTime,
    level: &str,
    record: &Record<'_>,
) -> io::Result<()> {
    line.push(b' ');
    push_timestamp(line, now);
    line.push(b' ');
    line.extend_from_slice(level.as_bytes());
    line.push(b' ');
    line.extend_from_slice(record.target().as_bytes());
    line.extend_from_slice(b" > ");
    match record.args().as_str() {
        Some(msg) => line.extend_from_slice(msg.as_bytes()),
        None => write!(line, "{}", record.args())?,
    }
    each_field(
        record,
        |line, key, field| {
            if matches!(field, Field::Null) {
                return Ok(());
            }
            line.push(b' ');
            line.extend_from_slice(key.as_bytes());
            line.push(b'=');
            match field {
                Field::Null => {}
                Field::Text(v) if needs_quotes(&v) => write!(line, "{v:?}")?,
                Field::Text(v) => line.extend_from_slice(v.as_bytes()),
                number => push_number(line, &number)?,
            }
            Ok(())
        },
        line,
    )?;
    line.push(b'\n');
    Ok(())
}

fn needs_quotes(v: &str) -> bool {
    v.is_empty()
        || v.bytes()
            .any(|b| b <= b' ' || b >= 0x7f || b == b'"' || b == b'=')
}

/// One JSON object on one line: `ts`, `level`, `target`, `msg`, then the
/// record's fields (numbers as numbers, a missing value as `null`).
fn json_line(line: &mut Vec<u8>, now: SystemTime, record: &Record<'_>) -> io::Result<()> {
    line.extend_from_slice(b"{\"ts\":\"");
    push_timestamp(line, now);
    line.extend_from_slice(b"\",\"level\":\"");
    line.extend_from_slice(record.level().as_str().as_bytes());
    line.extend_from_slice(b"\",\"target\":");
    json_string(line, record.target())?;
    line.extend_from_slice(b",\"msg\":");
    match record.args().as_str() {
        Some(msg) => json_string(line, msg)?,
        None => json_string(line, &record.args().to_string())?,
    }
    each_field(
        record,
        |line, key, field| {
            line.push(b',');
            json_string(line, key)?;
            line.push(b':');
            match field {
                Field::Null => line.extend_from_slice(b"null"),
                Field::Text(v) => json_string(line, &v)?,
                // JSON has no NaN or infinity.
                Field::F64(v) if !v.is_finite() => json_string(line, &v.to_string())?,
                number => push_number(line, &number)?,
            }
            Ok(())
        },
        line,
    )?;
    line.extend_from_slice(b"}\n");
    Ok(())
}

fn json_string(line: &mut Vec<u8>, s: &str) -> io::Result<()> {
    serde_json::to_writer(line, s).map_err(io::Error::other)
}

/// `2026-12-02T01:04:06.123Z`: RFC 3339, UTC, milliseconds.
fn push_timestamp(line: &mut Vec<u8>, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rest = secs % 86_400;
    push_padded(line, year.max(0) as u64, 4);
    line.push(b'-');
    push_padded(line, month, 2);
    line.push(b'-');
    push_padded(line, day, 2);
    line.push(b'T');
    push_padded(line, rest / 3600, 2);
    line.push(b':');
    push_padded(line, rest % 3600 / 60, 2);
    line.push(b':');
    push_padded(line, rest % 60, 2);
    line.push(b'.');
    push_padded(line, u64::from(since.subsec_millis()), 3);
    line.push(b'Z');
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `n` in decimal, zero-padded to `width` digits.
fn push_padded(line: &mut Vec<u8>, n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    let mut i = digits.len();
    let mut n = n;
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let start = i.min(digits.len() - width.min(digits.len()));
    line.extend_from_slice(&digits[start..]);
}

fn push_number(line: &mut Vec<u8>, field: &Field<'_>) -> io::Result<()> {
    match *field {
        Field::U64(v) => push_padded(line, v, 1),
        Field::I64(v) => {
            if v < 0 {
                line.push(b'-');
            }
            push_padded(line, v.unsigned_abs(), 1)
        }
        Field::F64(v) => write!(line, "{v}")?,
        Field::Bool(v) => line.extend_from_slice(if v { b"true" } else { b"false" }),
        Field::Null | Field::Text(_) => {}
    }
    Ok(())
}

/// A key-value's value as the formats print it.
enum Field<'v> {
    Null,
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Text(std::borrow::Cow<'v, str>),
}

/// Calls `write` with the line and each of the record's key-values, in order.
fn each_field<W>(record: &Record<'_>, write: W, line: &mut Vec<u8>) -> io::Result<()>
where
    W: FnMut(&mut Vec<u8>, &str, Field<'_>) -> io::Result<()>,
{
    struct Each<'l, W> {
        write: W,
        line: &'l mut Vec<u8>,
        failed: Option<io::Error>,
    }
    impl<'kvs, W> VisitSource<'kvs> for Each<'_, W>
    where
        W: FnMut(&mut Vec<u8>, &str, Field<'_>) -> io::Result<()>,
    {
        fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), kv::Error> {
            let mut field = None;
            value.visit(ToField(&mut field))?;
            let field = field.unwrap_or_else(|| Field::Text(value.to_string().into()));
            (self.write)(self.line, key.as_str(), field).map_err(|e| {
                self.failed = Some(e);
                kv::Error::msg("writing a log line failed")
            })
        }
    }
    let mut each = Each {
        write,
        line,
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
        *self.0 = Some(Field::U64(value));
        Ok(())
    }
    fn visit_i64(&mut self, value: i64) -> Result<(), kv::Error> {
        *self.0 = Some(Field::I64(value));
        Ok(())
    }
    fn visit_f64(&mut self, value: f64) -> Result<(), kv::Error> {
        *self.0 = Some(Field::F64(value));
        Ok(())
    }
    fn visit_bool(&mut self, value: bool) -> Result<(), kv::Error> {
        *self.0 = Some(Field::Bool(value));
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
        let at = UNIX_EPOCH + std::time::Duration::from_millis(1_796_173_446_123);
        let mut out = Vec::new();
        if json {
            json_line(&mut out, at, record).expect("write");
        } else {
            text_line(&mut out, at, "INFO ", record).expect("write");
        }
        String::from_utf8(out).expect("utf-8")
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        let at = |ms: u64| {
            let mut out = Vec::new();
            push_timestamp(&mut out, UNIX_EPOCH + std::time::Duration::from_millis(ms));
            String::from_utf8(out).expect("utf-8")
        };
        assert_eq!(at(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(at(951_782_400_500), "2000-02-29T00:00:00.500Z");
        assert_eq!(at(1_796_173_446_123), "2026-12-02T01:04:06.123Z");
        assert_eq!(at(4_102_444_799_999), "2099-12-31T23:59:59.999Z");
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
                "ts": "2026-12-02T01:04:06.123Z", "level": "INFO",
                "target": "portal_sync::conn", "msg": "connection closed",
                "conn": "c1", "code": 1008, "reason": "token \"expired\"\n", "user": null
            })
        );
        assert_eq!(
            render(false, &record),
            " 2026-12-02T01:04:06.123Z INFO  portal_sync::conn > connection closed conn=c1 \
             code=1008 reason=\"token \\\"expired\\\"\\n\"\n"
        );
    }
}
