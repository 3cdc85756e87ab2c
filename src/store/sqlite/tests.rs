//! The engine's own tests: schema, access order, batches, the file watch.

use super::admin::*;
use super::batch::*;
use super::reads::*;
use super::*;
use crate::domain::access::{Needs, Requester};
use crate::domain::merge::Change;
use crate::domain::model::Role;
use serde_json::json;

fn fixture() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = SqliteStore::open(&dir.path().join("t.db"), Synchronous::Normal).expect("open");
    let c = db.conn().expect("conn");
    add_user(&c, "o", "o@x", "O").expect("user");
    add_user(&c, "v", "v@x", "V").expect("user");
    add_user(&c, "n", "n@x", "N").expect("user");
    add_library(&c, "lib", "L", "o").expect("lib");
    set_member(&c, "lib", "v", "VIEWER").expect("member");
    add_view(&c, "pv", "lib", "P", &Map::new()).expect("view");
    drop(c);
    (dir, db)
}

#[test]
fn schema_is_idempotent_and_access_follows_spec_order() {
    let (dir, db) = fixture();
    drop(db);
    let db = SqliteStore::open(&dir.path().join("t.db"), Synchronous::Full).expect("reopen");
    let c = db.conn().expect("conn");
    assert_eq!(access(&c, "o", "pv").expect("owner").role, Role::Controller);
    assert_eq!(access(&c, "v", "pv").expect("viewer").role, Role::Viewer);
    assert!(matches!(access(&c, "zz", "nope"), Err(Error::UnknownUser)));
    assert!(matches!(access(&c, "n", "nope"), Err(Error::ViewNotFound)));
    assert!(matches!(access(&c, "n", "pv"), Err(Error::AccessDenied)));
    assert!(matches!(access(&c, "n", "../x"), Err(Error::ViewNotFound)));
}

#[test]
fn batch_versions_are_gapless_and_per_op() {
    let (_dir, db) = fixture();
    let mut c = db.conn().expect("conn");
    let merge = |v: Value| match v {
        Value::Object(m) => Some(Change::Merge(m)),
        _ => None,
    };
    let ops = vec![
        StoreOp {
            view_id: "pv".into(),
            change: merge(json!({"a":1})),
            if_match: None,
            want_row: false,
            event: None,
            requester: None,
        },
        StoreOp {
            view_id: "nope".into(),
            change: merge(json!({"a":1})),
            if_match: None,
            want_row: false,
            event: None,
            requester: None,
        },
        StoreOp {
            view_id: "pv".into(),
            change: merge(json!({"b":2})),
            if_match: Some(vec![0]),
            want_row: false,
            event: None,
            requester: None,
        },
        StoreOp {
            view_id: "pv".into(),
            change: merge(json!({"a":null})),
            if_match: Some(vec![1]),
            want_row: true,
            event: None,
            requester: None,
        },
    ];
    let results = apply_batch(&mut c, &ops, usize::MAX).expect("commit");
    assert_eq!(results[0].as_ref().expect("ok").version, 1);
    assert!(matches!(results[1], Err(Error::ViewNotFound)));
    assert!(matches!(
        results[2],
        Err(Error::PreconditionFailed { current: 1 })
    ));
    let last = results[3].as_ref().expect("ok");
    assert_eq!(last.version, 2);
    assert_eq!(last.row.as_ref().expect("row").state.get(), "{}");
    let stored = view(&c, "pv").expect("read").expect("row");
    assert_eq!(stored.version, 2);
    assert_eq!(stored.state.get(), "{}");
}

/// The file renamed away is missing (and storage calls are refused); a
/// new file at the path is not the one opened; the original renamed back
/// is found again. A write batch is refused while it is away.
#[tokio::test]
async fn a_moved_or_replaced_file_is_noticed_and_its_return_too() {
    let (dir, db) = fixture();
    let path = dir.path().join("t.db");
    let away = dir.path().join("away.db");
    assert!(db.check_file().is_ok());
    std::fs::rename(&path, &away).expect("move away");
    assert!(matches!(db.check_file(), Err(Error::DatabaseMissing)));
    let refused = db.refuse_batch(2).expect("refused while away");
    assert_eq!(refused.len(), 2);
    assert!(matches!(refused[0], Err(Error::DatabaseMissing)));
    assert!(matches!(db.unavailable(), Some(Error::DatabaseMissing)));
    std::fs::write(&path, "").expect("another file");
    assert!(matches!(db.check_file(), Err(Error::DatabaseMissing)));
    std::fs::rename(&away, &path).expect("move back");
    assert!(db.check_file().is_ok());
    assert!(db.refuse_batch(1).is_none());
    assert!(db.unavailable().is_none());
}

/// Each op's result as its new version or its error code.
fn outcomes(results: &[Result<Stored, Error>]) -> Vec<String> {
    results
        .iter()
        .map(|r| match r {
            Ok(stored) => stored.version.to_string(),
            Err(e) => e.code().to_string(),
        })
        .collect()
}

fn merge_op(view: &str, patch: Value, requester: Option<Requester>) -> StoreOp {
    let Value::Object(patch) = patch else {
        panic!("not an object: {patch}")
    };
    StoreOp {
        view_id: view.into(),
        change: Some(Change::Merge(patch)),
        if_match: None,
        want_row: false,
        event: None,
        requester,
    }
}

fn by(user: &str, expires_at: u64, needs: Needs) -> Option<Requester> {
    Some(Requester {
        user_id: user.into(),
        expires_at,
        needs,
    })
}

/// SPEC §4: access and the token hold when the change is applied, read
/// inside the write transaction; a refused op changes nothing.
#[test]
fn requesters_are_checked_when_applied() {
    let (_dir, db) = fixture();
    let mut c = db.conn().expect("conn");
    add_user(&c, "e", "e@x", "E").expect("user");
    set_member(&c, "lib", "e", "EDITOR").expect("member");
    let later = crate::domain::clock::now_secs() + 3600;
    let results = apply_batch(
        &mut c,
        &[
            merge_op("pv", json!({"a": 1}), by("e", later, Needs::Controller)),
            merge_op("pv", json!({"o": 1}), by("o", later, Needs::Controller)),
            merge_op("pv", json!({"v": 1}), by("v", later, Needs::Controller)),
            merge_op("pv", json!({"n": 1}), by("n", later, Needs::Controller)),
            merge_op("pv", json!({"z": 1}), by("zz", later, Needs::Controller)),
            merge_op("pv", json!({"x": 1}), by("e", 1, Needs::Controller)),
            merge_op("pv", json!({"b": 2}), by("e", later, Needs::Controller)),
        ],
        usize::MAX,
    )
    .expect("commit");
    let outcome = outcomes(&results);
    assert_eq!(
        outcome,
        [
            "1",
            "2",
            "FORBIDDEN",
            "ACCESS_DENIED",
            "UNKNOWN_USER",
            "TOKEN_EXPIRED",
            "3"
        ]
    );
    set_member(&c, "lib", "e", "VIEWER").expect("downgrade");
    let results = apply_batch(
        &mut c,
        &[
            merge_op("pv", json!({"c": 3}), by("e", later, Needs::Controller)),
            StoreOp {
                view_id: "pv".into(),
                change: None,
                if_match: None,
                want_row: true,
                event: None,
                requester: by("e", later, Needs::Member),
            },
        ],
        usize::MAX,
    )
    .expect("commit");
    assert!(matches!(results[0], Err(Error::Forbidden(_))));
    assert_eq!(results[1].as_ref().expect("a member may read").version, 3);
    remove_member(&c, "lib", "e").expect("remove");
    let results = apply_batch(
        &mut c,
        &[merge_op(
            "pv",
            json!({"d": 4}),
            by("e", later, Needs::Member),
        )],
        usize::MAX,
    )
    .expect("commit");
    assert!(matches!(results[0], Err(Error::AccessDenied)));
    let stored = view(&c, "pv").expect("read").expect("row");
    assert_eq!(stored.version, 3);
    assert_eq!(stored.state.get(), r#"{"a":1,"b":2,"o":1}"#);
}

/// SPEC §5: a change that would make the stored state longer than the
/// cap is refused and changes nothing; the rest of the batch goes on.
#[test]
fn the_state_cap_refuses_only_the_change_past_it() {
    let (_dir, db) = fixture();
    let mut c = db.conn().expect("conn");
    let replace = |v: Value| StoreOp {
        change: match v {
            Value::Object(m) => Some(Change::Replace(m)),
            _ => None,
        },
        ..merge_op("pv", json!({}), None)
    };
    let item = |id: &str, v: Value| StoreOp {
        change: match v {
            Value::Object(patch) => Some(Change::Item {
                item_id: id.into(),
                patch,
            }),
            _ => None,
        },
        ..merge_op("pv", json!({}), None)
    };
    // {"a":"xxxxxxxxxxxx"} is 20 bytes: exactly the cap.
    let results = apply_batch(
        &mut c,
        &[
            merge_op("pv", json!({"a": "x".repeat(12)}), None),
            merge_op("pv", json!({"b": 1}), None),
            replace(json!({"r": "y".repeat(14)})),
            item("1", json!({})),
            merge_op("pv", json!({"a": "x".repeat(11)}), None),
            merge_op("pv", json!({}), None),
            replace(json!({"r": "y".repeat(12)})),
        ],
        20,
    )
    .expect("commit");
    let outcome = outcomes(&results);
    assert_eq!(
        outcome,
        [
            "1",
            "STATE_TOO_LARGE",
            "STATE_TOO_LARGE",
            "STATE_TOO_LARGE",
            "2",
            "3",
            "4"
        ]
    );
    let stored = view(&c, "pv").expect("read").expect("row");
    assert_eq!(stored.version, 4);
    assert_eq!(
        stored.state.get(),
        format!(r#"{{"r":"{}"}}"#, "y".repeat(12))
    );
    assert_eq!(stored.state.get().len(), 20);
    match &results[1] {
        Err(e) => assert_eq!(
            e.client_message(),
            "state too large: the change would make the state 26 bytes, over the limit of 20"
        ),
        Ok(_) => panic!("refused"),
    }
}

/// Writers that share nothing but the file (separate pools, as separate
/// processes would) still produce gapless versions.
#[test]
fn independent_writers_get_gapless_versions() {
    let (dir, db) = fixture();
    drop(db);
    let path = dir.path().join("t.db");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let path = path.clone();
            std::thread::spawn(move || {
                let db = SqliteStore::open(&path, Synchronous::Normal).expect("open");
                let mut c = db.conn().expect("conn");
                (0..50)
                    .map(|i| {
                        let mut patch = Map::new();
                        patch.insert(format!("t{t}"), json!(i));
                        let op = StoreOp {
                            view_id: "pv".into(),
                            change: Some(Change::Merge(patch)),
                            if_match: None,
                            want_row: false,
                            event: None,
                            requester: None,
                        };
                        let mut results = apply_batch(&mut c, &[op], usize::MAX).expect("commit");
                        results.remove(0).expect("applied").version
                    })
                    .collect::<Vec<i64>>()
            })
        })
        .collect();
    let mut versions: Vec<i64> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, (1..=200).collect::<Vec<i64>>());
    let db = SqliteStore::open(&path, Synchronous::Normal).expect("open");
    let stored = view(&db.conn().expect("conn"), "pv")
        .expect("read")
        .expect("row");
    assert_eq!(stored.version, 200);
    let state: Value = serde_json::from_str(stored.state.get()).expect("json");
    assert_eq!(state, json!({"t0": 49, "t1": 49, "t2": 49, "t3": 49}));
}
