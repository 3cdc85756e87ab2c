//! The schema and its migrations, applied at every start.

use postgres::Client;

use crate::domain::error::Error;

const SCHEMA: &str = include_str!("schema.sql");

/// The advisory lock nodes take around the migration (distinct from the
/// membership log's, schema.sql).
const MIGRATION_LOCK: i64 = 7_061_727_469_616_300;

/// Applies schema.sql in one transaction under an advisory lock: two nodes
/// starting at once take turns (`CREATE … IF NOT EXISTS` alone races on
/// the catalog), and a failure leaves nothing half made.
pub(super) fn migrate(client: &mut Client) -> Result<(), Error> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    // `… already exists, skipping` at every start is no news.
    tx.batch_execute("SET LOCAL client_min_messages = warning")?;
    tx.batch_execute(SCHEMA)?;
    tx.commit()?;
    Ok(())
}
