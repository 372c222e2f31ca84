//! Drafts: the configuration a browser is editing, kept on the server (sparse: only values that
//! differ from the defaults), so switching tabs or reloading never loses an edit.

use rusqlite::{params, OptionalExtension};

use crate::db::Db;
use crate::registry::Config;

pub fn load(db: &Db, id: &str) -> Config {
    let conn = db.conn();
    let text: Option<String> = conn
        .query_row("SELECT config FROM drafts WHERE id = ?1", params![id], |r| r.get(0))
        .optional()
        .unwrap_or(None);
    text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default()
}

pub fn store(db: &Db, id: &str, config: &Config) -> rusqlite::Result<()> {
    db.conn().execute(
        "INSERT INTO drafts (id, config) VALUES (?1, ?2)
         ON CONFLICT(id) DO UPDATE SET config = excluded.config, updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now')",
        params![id, serde_json::to_string(config).expect("JSON")],
    )?;
    Ok(())
}

/// A new random draft id (128 bits, hex), for the browser's cookie.
pub fn new_id() -> String {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes).expect("the OS random source works");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
