-- portal-sync schema for PostgreSQL (SPEC.md §1, §8). Applied at every start,
-- in one transaction under an advisory lock (schema.rs), so nodes starting at
-- once take turns. Every statement is idempotent, and it works on a database
-- whose SPEC tables another tool created with exactly SPEC's columns.

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
    state      JSONB NOT NULL DEFAULT '{}',
    version    BIGINT NOT NULL DEFAULT 0,
    updated_at TIMESTAMPTZ
);

-- Beyond SPEC: lookups by user (revocation, listing a user's libraries) and
-- views by library.
CREATE INDEX IF NOT EXISTS library_members_user ON library_members(user_id);
CREATE INDEX IF NOT EXISTS portal_views_library ON portal_views(library_id);

-- Beyond SPEC: a log of membership changes, written by triggers so that every
-- writer (the REST routes on any node, the admin CLI, psql) is covered; each
-- change also wakes every node's LISTEN (listen.rs). Old rows are pruned at
-- start.
CREATE TABLE IF NOT EXISTS membership_changes (
    seq        BIGSERIAL PRIMARY KEY,
    library_id TEXT NOT NULL,
    user_id    TEXT NOT NULL,
    at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The cursor trap: nodes read "every change after seq N", and a BIGSERIAL
-- alone is not safe for that (a transaction may draw seq 7, a later one 8 and
-- commit first: a reader sees 8, moves its cursor past 7, and never sees 7).
-- So each change first takes one transaction-scoped advisory lock, held until
-- its transaction ends: seqs are drawn in commit order, and whoever sees seq N
-- committed sees every seq before it. Membership changes are rare (people,
-- not messages), so serializing them costs nothing that matters; reading by
-- `pg_snapshot_xmin` instead would let any long-open transaction anywhere in
-- the database hold every revocation back.
CREATE OR REPLACE FUNCTION portal_membership_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(7061727469616301);
    IF TG_TABLE_NAME = 'libraries' THEN
        INSERT INTO membership_changes (library_id, user_id) VALUES (OLD.id, OLD.owner_id);
    ELSE
        INSERT INTO membership_changes (library_id, user_id) VALUES (OLD.library_id, OLD.user_id);
    END IF;
    PERFORM pg_notify('portal_membership', '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER library_members_role_changed
AFTER UPDATE OF role ON library_members
FOR EACH ROW WHEN (OLD.role IS DISTINCT FROM NEW.role)
EXECUTE FUNCTION portal_membership_changed();

CREATE OR REPLACE TRIGGER library_members_removed
AFTER DELETE ON library_members
FOR EACH ROW EXECUTE FUNCTION portal_membership_changed();

CREATE OR REPLACE TRIGGER library_owner_changed
AFTER UPDATE OF owner_id ON libraries
FOR EACH ROW WHEN (OLD.owner_id IS DISTINCT FROM NEW.owner_id)
EXECUTE FUNCTION portal_membership_changed();

-- Every broadcast is stored with its state change, in the same transaction,
-- so a node that missed one on Redis fills the gap from here (read by
-- per-view version ranges, never by a global cursor). Kept to the last 4096
-- per view.
CREATE TABLE IF NOT EXISTS portal_view_events (
    view_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    node    TEXT NOT NULL,
    conn    BIGINT,
    message TEXT NOT NULL,
    PRIMARY KEY (view_id, version)
);

-- A commit whose outcome is unknown (the connection dropped during COMMIT):
-- each batch inserts its random id here in its own transaction, and a retry
-- inserts the same id first (batch.rs). A conflict means the first attempt
-- committed. Ids are kept for minutes (the retry window is seconds).
CREATE TABLE IF NOT EXISTS portal_batches (
    id TEXT PRIMARY KEY,
    at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS portal_batches_at ON portal_batches(at);
