-- portal-sync schema (SPEC.md §1). Applied at every start: every statement is
-- idempotent, and it works on a database whose tables another tool created.

CREATE TABLE IF NOT EXISTS users (
    id    TEXT PRIMARY KEY,
    email TEXT UNIQUE NOT NULL,
    name  TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS libraries (
    id       TEXT PRIMARY KEY,
    name     TEXT NOT NULL,
    owner_id TEXT NOT NULL REFERENCES users(id)
);

CREATE TABLE IF NOT EXISTS library_members (
    library_id TEXT REFERENCES libraries(id),
    user_id    TEXT REFERENCES users(id),
    role       TEXT NOT NULL CHECK (role IN ('OWNER', 'EDITOR', 'VIEWER')),
    PRIMARY KEY (library_id, user_id)
);

CREATE TABLE IF NOT EXISTS portal_views (
    id         TEXT PRIMARY KEY,
    library_id TEXT NOT NULL REFERENCES libraries(id),
    name       TEXT NOT NULL,
    state      TEXT NOT NULL DEFAULT '{}',
    version    INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT
);

-- Beyond SPEC: lookups by user (revocation, listing a user's libraries) and
-- views by library.
CREATE INDEX IF NOT EXISTS library_members_user ON library_members(user_id);
CREATE INDEX IF NOT EXISTS portal_views_library ON portal_views(library_id);

-- Beyond SPEC: a log of membership changes, written by triggers so that every
-- writer (the REST routes, the admin CLI, another node, a sqlite3 shell) is
-- covered. Running servers poll it and close the affected connections with
-- 1008 `access revoked` (SPEC §3.4). Old rows are pruned at start.
CREATE TABLE IF NOT EXISTS membership_changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    library_id TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    at         INTEGER NOT NULL DEFAULT (CAST(strftime('%s', 'now') AS INTEGER))
);

CREATE TRIGGER IF NOT EXISTS library_members_role_changed
AFTER UPDATE OF role ON library_members
WHEN OLD.role IS NOT NEW.role
BEGIN
    INSERT INTO membership_changes (library_id, user_id) VALUES (OLD.library_id, OLD.user_id);
END;

CREATE TRIGGER IF NOT EXISTS library_members_removed
AFTER DELETE ON library_members
BEGIN
    INSERT INTO membership_changes (library_id, user_id) VALUES (OLD.library_id, OLD.user_id);
END;

CREATE TRIGGER IF NOT EXISTS library_owner_changed
AFTER UPDATE OF owner_id ON libraries
WHEN OLD.owner_id IS NOT NEW.owner_id
BEGIN
    INSERT INTO membership_changes (library_id, user_id) VALUES (OLD.id, OLD.owner_id);
END;

-- Multi-node fan-out (--redis-url): every broadcast is stored with its state
-- change, in the same transaction, so a node that missed one on Redis (a
-- reordering, a Redis restart) fills the gap from here. Kept to the last 4096
-- per view; unused (empty) on a single node.
CREATE TABLE IF NOT EXISTS portal_view_events (
    view_id TEXT NOT NULL,
    version INTEGER NOT NULL,
    node TEXT NOT NULL,
    conn INTEGER,
    message TEXT NOT NULL,
    PRIMARY KEY (view_id, version)
) WITHOUT ROWID;
