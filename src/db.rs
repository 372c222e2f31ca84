//! The SQLite database: opened in WAL mode, migrated at start-up from the embedded `migrations/*.sql`.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{Context, Result};
use include_dir::{include_dir, Dir};
use rusqlite::Connection;
use rusqlite_migration::{Migrations, M};

static MIGRATION_FILES: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/migrations");

/// The migrations in file-name order (`0001_…`, `0002_…`).
pub fn migrations() -> Migrations<'static> {
    let mut files: Vec<_> = MIGRATION_FILES
        .files()
        .filter(|f| f.path().extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort_by_key(|f| f.path());
    Migrations::new(files.into_iter().map(|f| M::up(f.contents_utf8().expect("migrations are UTF-8"))).collect())
}

/// How many migrations this binary knows.
pub fn latest_version() -> usize {
    MIGRATION_FILES.files().filter(|f| f.path().extension().is_some_and(|e| e == "sql")).count()
}

/// The schema version a database is at (`PRAGMA user_version`).
pub fn schema_version(conn: &Connection) -> Result<usize> {
    Ok(conn.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize)
}

/// A shared connection. SQLite serialises writers anyway; one connection behind a mutex keeps the
/// web app simple, and every statement is short.
#[derive(Clone)]
pub struct Db {
    conn: Arc<Mutex<Connection>>,
}

impl Db {
    /// Opens (creating if needed) the database file, switches it to WAL and applies every pending
    /// migration, so a database left at an older version upgrades in place.
    pub fn open(path: &Path) -> Result<Db> {
        let mut conn = Connection::open(path).with_context(|| format!("cannot open the database {}", path.display()))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // The queue runs a few dozen distinct statements over and over; keep them all prepared.
        conn.set_prepared_statement_cache_capacity(64);
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            anyhow::bail!("the database {} could not be switched to WAL mode (got {mode})", path.display());
        }
        conn.execute_batch("PRAGMA foreign_keys=ON; PRAGMA synchronous=NORMAL;")?;
        let found = schema_version(&conn)?;
        if found > latest_version() {
            anyhow::bail!(
                "the database {} is at schema version {found}, newer than this Loft knows ({}): use a newer Loft",
                path.display(),
                latest_version()
            );
        }
        migrations()
            .to_latest(&mut conn)
            .with_context(|| format!("cannot migrate the database {}", path.display()))?;
        Ok(Db { conn: Arc::new(Mutex::new(conn)) })
    }

    pub fn conn(&self) -> MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_valid() {
        migrations().validate().unwrap();
        assert!(latest_version() >= 2);
    }
}
