//! JSONB's text of a state turned into the text serde_json gives the same
//! value, without building the value.
//!
//! JSONB prints objects with its own key order (shorter keys first) and
//! `", "`/`": "` separators; the merge, the SQLite engine and a commit's own
//! row print serde_json's (keys in byte order, no spaces). Going through a
//! `serde_json::Value` gives that text but copies every string: a read of a
//! state of megabytes cost seconds in a debug build, a large share of it in
//! release. Here strings are copied as they are: PostgreSQL escapes a string
//! exactly as serde_json does (`\"`, `\\`, `\b\f\n\r\t`, other control
//! characters as lowercase `\u00xx`, nothing else), and numbers go through
//! serde_json's `Number`, so the result is byte for byte
//! `serde_json::to_string(&serde_json::from_str::<Value>(text))`.

use std::collections::BTreeMap;

use serde_json::value::RawValue;
use serde_json::Number;

/// The serde_json text of the JSON object or array `text`, or `None` when
/// it is not one.
pub(super) fn to_serde_text(text: &str) -> Option<String> {
    let text = text.trim();
    if !text.starts_with(['{', '[']) {
        return None;
    }
    let mut out = String::with_capacity(text.len());
    write(text, &mut out)?;
    Some(out)
}

/// Writes `text`, which is valid JSON except at the top, where an object
/// or array is validated as it is parsed.
fn write(text: &str, out: &mut String) -> Option<()> {
    match text.as_bytes().first()? {
        b'{' => {
            let members: BTreeMap<String, &RawValue> = serde_json::from_str(text).ok()?;
            out.push('{');
            for (i, (key, value)) in members.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(key).ok()?);
                out.push(':');
                write(value.get(), out)?;
            }
            out.push('}');
        }
        b'[' => {
            let items: Vec<&RawValue> = serde_json::from_str(text).ok()?;
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item.get(), out)?;
            }
            out.push(']');
        }
        b'"' | b't' | b'f' | b'n' => out.push_str(text),
        _ => {
            let number: Number = serde_json::from_str(text).ok()?;
            out.push_str(&number.to_string());
        }
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn via_value(text: &str) -> String {
        let value: Value = serde_json::from_str(text).expect("json");
        serde_json::to_string(&value).expect("text")
    }

    #[test]
    fn gives_serde_jsons_text() {
        for text in [
            r#"{"b": 1, "a": {"zz": [1, 2.5, -0.0, 1e300, 12345678901234567890], "y": null}}"#,
            r#"{"ccc": "x", "b": "quote \" back \\ nl \n tab \t ctl \u001f é ☃", "aa": true}"#,
            r#"{"": false, "é": {}, "e": [], "\u0001k": "v"}"#,
            r#"[{"b": 1, "a": 2}, "s", 3]"#,
            r#"  {"a" : [ ] }  "#,
        ] {
            assert_eq!(
                to_serde_text(text).as_deref(),
                Some(via_value(text).as_str()),
                "{text}"
            );
        }
        assert_eq!(to_serde_text("{"), None);
        assert_eq!(to_serde_text("nope"), None);
        assert_eq!(to_serde_text(r#""s""#), None);
        assert_eq!(to_serde_text(r#"{"a": tru}"#), None);
    }
}
