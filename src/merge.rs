//! How a portal view's state changes: JSON Merge Patch (RFC 7386) and the three
//! kinds of change built on it.

use serde_json::{Map, Value};

/// Applies `patch` to `target` in place, exactly as RFC 7386 §2 describes: an
/// object patch merges key by key (`null` deletes, and a non-object target is
/// first replaced by `{}`); any other patch replaces the target.
///
/// Recursion depth is bounded by the patch's depth, which serde_json's parser
/// already caps at 128.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(target) = target else {
        unreachable!("target was just made an object")
    };
    for (key, value) in patch {
        if value.is_null() {
            target.remove(key);
        } else {
            merge_patch(target.entry(key.as_str()).or_insert(Value::Null), value);
        }
    }
}

/// How deep a portal view's state may nest (the state object is level 1).
/// serde_json reads at most 128 levels, and every message that carries the
/// state wraps it one or two levels deeper, so a state much deeper than this
/// could be stored but never read back, by the server or its clients.
pub const MAX_STATE_DEPTH: usize = 64;

/// Levels of nesting: a scalar is 0, `{}` or `[]` is 1.
pub fn depth(value: &Value) -> usize {
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
    pub fn depth(&self) -> usize {
        match self {
            Change::Merge(map) | Change::Replace(map) => object_depth(map),
            Change::Item { patch, .. } => 2 + object_depth(patch),
        }
    }

    /// Refuses a change that would nest the state deeper than
    /// [`MAX_STATE_DEPTH`].
    pub fn check_depth(&self) -> Result<(), crate::Error> {
        if self.depth() > MAX_STATE_DEPTH {
            return Err(crate::Error::BadRequest(format!(
                "payload nested too deeply: a state may be at most {MAX_STATE_DEPTH} levels deep"
            )));
        }
        Ok(())
    }

    /// The message type that carries this change on the wire.
    pub fn message_type(&self) -> &'static str {
        match self {
            Change::Merge(_) => "portal-view-update",
            Change::Item { .. } => "item-update",
            Change::Replace(_) => "sync-response",
        }
    }

    /// Applies the change to a state that is always kept a JSON object.
    pub fn apply(&self, state: &mut Map<String, Value>) {
        match self {
            Change::Merge(patch) => {
                for (key, value) in patch {
                    if value.is_null() {
                        state.remove(key);
                    } else {
                        merge_patch(state.entry(key.as_str()).or_insert(Value::Null), value);
                    }
                }
            }
            Change::Item { item_id, patch } => {
                let items = state
                    .entry("items")
                    .or_insert_with(|| Value::Object(Map::new()));
                if !items.is_object() {
                    *items = Value::Object(Map::new());
                }
                let Value::Object(items) = items else {
                    unreachable!("items was just made an object")
                };
                let item = items.entry(item_id.as_str()).or_insert(Value::Null);
                merge_patch(item, &Value::Object(patch.clone()));
            }
            Change::Replace(new_state) => *state = new_state.clone(),
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
