//! How a portal view's state changes: JSON Merge Patch (RFC 7386) and the three
//! kinds of change built on it.

use serde_json::{Map, Value};

use crate::domain::error::Error;

/// Applies `patch` to `target` in place, exactly as RFC 7386 §2 describes: an
/// object patch merges key by key (`null` deletes, and a non-object target is
/// first replaced by `{}`); any other patch replaces the target.
///
/// Recursion depth is bounded by the patch's depth, which serde_json's parser
/// already caps at 128.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    match patch {
        Value::Object(patch) => merge_object(as_object(target), patch),
        _ => *target = patch.clone(),
    }
}

/// [`merge_patch`] of an object patch into an object: the one loop every
/// kind of change runs.
fn merge_object(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.as_str()).or_insert(Value::Null), value);
        }
    }
}

/// RFC 7386: an object patch first replaces a target that is not an object
/// with `{}`.
fn as_object(target: &mut Value) -> &mut Map<String, Value> {
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    match target {
        Value::Object(map) => map,
        _ => unreachable!("target was just made an object"),
    }
}

/// How deep a portal view's state may nest (the state object is level 1).
/// serde_json reads at most 128 levels, and every message that carries the
/// state wraps it one or two levels deeper, so a state much deeper than this
/// could be stored but never read back, by the server or its clients.
pub(crate) const MAX_STATE_DEPTH: usize = 64;

/// Levels of nesting: a scalar is 0, `{}` or `[]` is 1.
pub(crate) fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn object_depth(map: &Map<String, Value>) -> usize {
    1 + map.values().map(depth).max().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn depth_counts_levels() {
        assert_eq!(depth(&json!(1)), 0);
        assert_eq!(depth(&json!({})), 1);
        assert_eq!(depth(&json!({"a": [1, {"b": 2}]})), 3);
    }

    fn apply(target: Value, patch: Value) -> Value {
        let mut t = target;
        merge_patch(&mut t, &patch);
        t
    }

    /// The test vectors of RFC 7386 Appendix A.
    #[test]
    fn rfc7386_appendix_a() {
        let cases = [
            (json!({"a":"b"}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"b"}), json!({"b":"c"}), json!({"a":"b","b":"c"})),
            (json!({"a":"b"}), json!({"a":null}), json!({})),
            (
                json!({"a":"b","b":"c"}),
                json!({"a":null}),
                json!({"b":"c"}),
            ),
            (json!({"a":["b"]}), json!({"a":"c"}), json!({"a":"c"})),
            (json!({"a":"c"}), json!({"a":["b"]}), json!({"a":["b"]})),
            (
                json!({"a":{"b":"c"}}),
                json!({"a":{"b":"d","c":null}}),
                json!({"a":{"b":"d"}}),
            ),
            (json!({"a":[{"b":"c"}]}), json!({"a":[1]}), json!({"a":[1]})),
            (json!(["a", "b"]), json!(["c", "d"]), json!(["c", "d"])),
            (json!({"a":"b"}), json!(["c"]), json!(["c"])),
            (json!({"a":"foo"}), json!(null), json!(null)),
            (json!({"a":"foo"}), json!("bar"), json!("bar")),
            (json!({"e":null}), json!({"a":1}), json!({"e":null,"a":1})),
            (json!([1, 2]), json!({"a":"b","c":null}), json!({"a":"b"})),
            (
                json!({}),
                json!({"a":{"bb":{"ccc":null}}}),
                json!({"a":{"bb":{}}}),
            ),
        ];
        for (target, patch, expected) in cases {
            assert_eq!(
                apply(target.clone(), patch.clone()),
                expected,
                "{target} + {patch}"
            );
        }
    }
}

/// The three ways a state can change (SPEC §3.1), whatever transport asked.
#[derive(Debug, Clone)]
pub enum Change {
    /// `portal-view-update` and REST PATCH: a merge patch on the whole state.
    Merge(Map<String, Value>),
    /// `item-update`: a merge patch on `state.items[item_id]`.
    Item {
        item_id: String,
        patch: Map<String, Value>,
    },
    /// `sync-response`: the payload becomes the state.
    Replace(Map<String, Value>),
}

impl Change {
    /// How deep the state gets where this change lands: an item's patch sits
    /// two levels below the state (`state.items[id]`).
    pub(crate) fn depth(&self) -> usize {
        match self {
            Change::Merge(map) | Change::Replace(map) => object_depth(map),
            Change::Item { patch, .. } => 2 + object_depth(patch),
        }
    }

    /// Refuses a change that would nest the state deeper than
    /// [`MAX_STATE_DEPTH`].
    pub(crate) fn check_depth(&self) -> Result<(), Error> {
        if self.depth() > MAX_STATE_DEPTH {
            return Err(Error::BadRequest(format!(
                "payload nested too deeply: a state may be at most {MAX_STATE_DEPTH} levels deep"
            )));
        }
        Ok(())
    }

    /// The message type that carries this change on the wire.
    pub(crate) fn message_type(&self) -> &'static str {
        match self {
            Change::Merge(_) => "portal-view-update",
            Change::Item { .. } => "item-update",
            Change::Replace(_) => "sync-response",
        }
    }

    /// The serialized size (as [`json_len`] counts it) that `state`, now `len`
    /// bytes, would have after this change, without applying it.
    ///
    /// Why not apply and measure: re-serializing the whole state for every
    /// change made a batch of 512 changes to a 512 KiB state cost 512 full
    /// serializations on the writer thread, which every other view's writes
    /// wait behind. RFC 7386 changes only what a patch names, so this walks
    /// the patch and, beside it, the parts of the state the patch touches: a
    /// serialized object is 2 bytes of braces, its entries, and a comma
    /// between each two, so adding, changing or removing an entry changes the
    /// size by that entry's difference and at most one comma. The only other
    /// cost is measuring what the change removes or replaces, which a change
    /// can do only once to each stored byte.
    pub(crate) fn len_after(&self, state: &Map<String, Value>, len: usize) -> usize {
        let delta = match self {
            Change::Merge(patch) => map_delta(state, patch),
            Change::Item { item_id, patch } => item_delta(state, item_id, patch),
            Change::Replace(new_state) => return json_len(new_state),
        };
        // Exact by construction (see the property test), so never below zero.
        len.saturating_add_signed(delta)
    }

    /// Applies the change to a state that is always kept a JSON object.
    pub fn apply(&self, state: &mut Map<String, Value>) {
        match self {
            Change::Merge(patch) => merge_object(state, patch),
            Change::Item { item_id, patch } => {
                let items = as_object(state.entry("items").or_insert(Value::Null));
                let item = as_object(items.entry(item_id.as_str()).or_insert(Value::Null));
                merge_object(item, patch);
            }
            Change::Replace(new_state) => *state = new_state.clone(),
        }
    }
}

/// The length of `value` serialized as the state column stores it (compact
/// serde_json), counted without building the text.
pub(crate) fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // A JSON value always serializes (string keys, finite numbers), and the
    // counter never fails.
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

/// Bytes of one object entry, `"key":value`, whose value is `value_len` long.
fn entry_len(key: &str, value_len: usize) -> isize {
    (json_len(key) + 1 + value_len) as isize
}

/// Commas between the entries of an object of `n` entries.
fn commas(n: usize) -> isize {
    n.saturating_sub(1) as isize
}

/// How much longer `target` gets when `patch` is merged into it (RFC 7386).
fn value_delta(target: &Value, patch: &Value) -> isize {
    match patch {
        Value::Object(patch) => object_patch_delta(target, patch),
        _ => json_len(patch) as isize - json_len(target) as isize,
    }
}

/// [`value_delta`] for an object patch: a target that is not an object is
/// replaced by `{}` first.
fn object_patch_delta(target: &Value, patch: &Map<String, Value>) -> isize {
    match target {
        Value::Object(target) => map_delta(target, patch),
        _ => fresh_len(patch) as isize - json_len(target) as isize,
    }
}

/// How much longer an object gets when the object `patch` is merged into it.
fn map_delta(target: &Map<String, Value>, patch: &Map<String, Value>) -> isize {
    let mut delta = 0;
    let mut entries = target.len();
    for (key, value) in patch {
        match (target.get(key), value) {
            (Some(old), Value::Null) => {
                delta -= entry_len(key, json_len(old));
                entries -= 1;
            }
            (None, Value::Null) => {}
            (Some(old), _) => delta += value_delta(old, value),
            (None, _) => {
                delta += entry_len(key, new_value_len(value));
                entries += 1;
            }
        }
    }
    delta + commas(entries) - commas(target.len())
}

/// The length of what a patch value becomes where the target had nothing.
fn new_value_len(value: &Value) -> usize {
    match value {
        Value::Object(patch) => fresh_len(patch),
        _ => json_len(value),
    }
}

/// The length of `{}` merged with `patch`: the patch without its nulls, at
/// every level.
fn fresh_len(patch: &Map<String, Value>) -> usize {
    let mut len = 2;
    let mut entries: usize = 0;
    for (key, value) in patch.iter().filter(|(_, v)| !v.is_null()) {
        len += json_len(key.as_str()) + 1 + new_value_len(value);
        entries += 1;
    }
    len + entries.saturating_sub(1)
}

/// How much longer the state gets when `patch` is merged into
/// `state.items[item_id]` (an `items` that is not an object becomes one).
fn item_delta(state: &Map<String, Value>, item_id: &str, patch: &Map<String, Value>) -> isize {
    match state.get("items") {
        Some(Value::Object(items)) => match items.get(item_id) {
            Some(old) => object_patch_delta(old, patch),
            None => {
                entry_len(item_id, fresh_len(patch)) + commas(items.len() + 1) - commas(items.len())
            }
        },
        other => {
            // `{"<item_id>":<the fresh item>}`
            let items_len = 2 + json_len(item_id) + 1 + fresh_len(patch);
            match other {
                Some(old) => items_len as isize - json_len(old) as isize,
                None => {
                    entry_len("items", items_len) + commas(state.len() + 1) - commas(state.len())
                }
            }
        }
    }
}

#[cfg(test)]
mod change_tests {
    use super::*;
    use serde_json::json;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            other => panic!("not an object: {other}"),
        }
    }

    #[test]
    fn item_update_creates_merges_and_replaces_non_object_items() {
        let mut state = obj(json!({"items": {"1": {"title": "a", "body": "b"}}, "x": 1}));
        Change::Item {
            item_id: "1".into(),
            patch: obj(json!({"title": "A", "body": null})),
        }
        .apply(&mut state);
        Change::Item {
            item_id: "2".into(),
            patch: obj(json!({"title": "new", "gone": null})),
        }
        .apply(&mut state);
        assert_eq!(
            Value::Object(state.clone()),
            json!({"items": {"1": {"title": "A"}, "2": {"title": "new"}}, "x": 1})
        );
        let mut state = obj(json!({"items": [1, 2]}));
        Change::Item {
            item_id: "7".into(),
            patch: obj(json!({"t": 1})),
        }
        .apply(&mut state);
        assert_eq!(Value::Object(state), json!({"items": {"7": {"t": 1}}}));
    }

    #[test]
    fn replace_and_merge() {
        let mut state = obj(json!({"a": {"b": 1, "c": 2}, "d": 3}));
        Change::Merge(obj(json!({"a": {"b": null, "e": 5}, "d": null}))).apply(&mut state);
        assert_eq!(Value::Object(state.clone()), json!({"a": {"c": 2, "e": 5}}));
        Change::Replace(obj(json!({"z": 0}))).apply(&mut state);
        assert_eq!(Value::Object(state), json!({"z": 0}));
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Keys from a tiny alphabet, so that patches often meet the state's keys,
    /// and now and then a string that needs escaping.
    fn key() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => "[a-c]{1,2}",
            1 => any::<String>(),
            1 => Just("items".to_string()),
            1 => Just("q\"\\\n\u{1}é𝄞".to_string()),
        ]
    }

    fn leaf() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<u64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            any::<String>().prop_map(Value::from),
            "[\\x00-\\x1f\"\\\\/a\u{7f}\u{2028}é]{0,6}".prop_map(Value::from),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        leaf().prop_recursive(4, 48, 5, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(key(), inner, 0..5)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    fn object() -> impl Strategy<Value = Map<String, Value>> {
        prop::collection::btree_map(key(), value(), 0..6).prop_map(|m| m.into_iter().collect())
    }

    fn check(state: &Map<String, Value>, change: &Change) -> Result<(), TestCaseError> {
        let before = json_len(state);
        prop_assert_eq!(
            before,
            serde_json::to_string(state).map(|s| s.len()).unwrap_or(0)
        );
        let predicted = change.len_after(state, before);
        let mut after = state.clone();
        change.apply(&mut after);
        let actual = serde_json::to_string(&after).map(|s| s.len()).unwrap_or(0);
        prop_assert_eq!(
            predicted,
            actual,
            "{:?} on {}",
            change,
            Value::Object(state.clone())
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        /// The predicted size is the real size of the result, for all three
        /// kinds of change, whatever the state and the patch.
        #[test]
        fn predicted_size_is_exact(
            state in object(),
            patch in object(),
            items in prop::option::of(value()),
            item_id in prop_oneof!["[a-c]{1,2}", "[A-Za-z0-9_-]{1,64}"],
        ) {
            let mut state = state;
            if let Some(items) = items {
                state.insert("items".into(), items);
            }
            check(&state, &Change::Merge(patch.clone()))?;
            check(&state, &Change::Item { item_id: item_id.clone(), patch: patch.clone() })?;
            check(&state, &Change::Replace(patch.clone()))?;
            // Patches built from the state itself hit every kind of entry.
            let mut echo: Map<String, Value> = state.clone();
            for (i, value) in echo.values_mut().enumerate() {
                if i % 3 == 0 {
                    *value = Value::Null;
                }
            }
            check(&state, &Change::Merge(echo.clone()))?;
            check(&state, &Change::Item { item_id, patch: echo })?;
        }
    }

    #[test]
    fn edge_cases() {
        let obj = |v: Value| match v {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        let cases = [
            (json!({}), Change::Merge(obj(json!({})))),
            (json!({}), Change::Merge(obj(json!({"a": null})))),
            (json!({"a": 1}), Change::Merge(obj(json!({"a": null})))),
            (
                json!({"a": 1, "b": 2}),
                Change::Merge(obj(json!({"a": null, "b": null, "c": {"d": null}}))),
            ),
            (
                json!({"a": [1]}),
                Change::Merge(obj(json!({"a": {"x": null, "y": {}}}))),
            ),
            (
                json!({"items": 3}),
                Change::Item {
                    item_id: "7".into(),
                    patch: obj(json!({"t": null})),
                },
            ),
            (
                json!({"x": 1}),
                Change::Item {
                    item_id: "7".into(),
                    patch: obj(json!({})),
                },
            ),
            (
                json!({"items": {}}),
                Change::Item {
                    item_id: "7".into(),
                    patch: obj(json!({"a": "\u{0}"})),
                },
            ),
            (
                json!({"items": {"7": "s"}}),
                Change::Item {
                    item_id: "7".into(),
                    patch: obj(json!({"a": 1.5})),
                },
            ),
        ];
        for (state, change) in cases {
            let state = obj(state);
            let mut after = state.clone();
            change.apply(&mut after);
            assert_eq!(
                change.len_after(&state, json_len(&state)),
                json_len(&after),
                "{change:?} on {state:?}"
            );
            assert_eq!(
                json_len(&after),
                serde_json::to_string(&after).map(|s| s.len()).unwrap_or(0)
            );
        }
    }
}
