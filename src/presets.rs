//! Presets: validated configurations saved under a name.

use rusqlite::{params, OptionalExtension};
use serde::Serialize;
use serde_json::Value;

use crate::db::Db;
use crate::registry::{Config, FieldError, Registry};

#[derive(Debug, Serialize)]
pub struct PresetSummary {
    pub name: String,
    pub description: String,
    pub updated_at: String,
    pub algo: String,
    pub family: String,
}

#[derive(Debug, Serialize)]
pub struct Preset {
    pub name: String,
    pub description: String,
    pub config: Config,
    pub created_at: String,
    pub updated_at: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    #[error("the configuration is not valid")]
    Invalid(Vec<FieldError>),
    #[error("name: {0}")]
    BadName(String),
    #[error("a preset named '{0}' already exists")]
    Exists(String),
    #[error("no preset named '{0}'")]
    NotFound(String),
    #[error(transparent)]
    Db(#[from] rusqlite::Error),
}

/// A preset name: 1–64 characters, no control characters, not only spaces.
pub fn check_name(name: &str) -> Result<String, PresetError> {
    let trimmed = name.trim();
    if trimmed.is_empty() {
        return Err(PresetError::BadName("must not be empty".into()));
    }
    if trimmed.chars().count() > 64 {
        return Err(PresetError::BadName(format!("must be at most 64 characters (got {})", trimmed.chars().count())));
    }
    if trimmed.chars().any(|c| c.is_control() || c == '/' || c == '\\') {
        return Err(PresetError::BadName("must not contain control characters or slashes".into()));
    }
    Ok(trimmed.to_string())
}

/// Validates `config` and returns it resolved (every registry key), which is what a preset stores.
pub fn validated(registry: &Registry, config: &Config) -> Result<Config, PresetError> {
    let mut config = config.clone();
    registry.apply_links(&mut config, &[]);
    let errors = registry.validate(&config);
    if !errors.is_empty() {
        return Err(PresetError::Invalid(errors));
    }
    Ok(registry.resolve(&config))
}

pub struct Presets<'a> {
    pub db: &'a Db,
    pub registry: &'a Registry,
}

impl Presets<'_> {
    pub fn list(&self) -> Result<Vec<PresetSummary>, PresetError> {
        let conn = self.db.conn();
        let mut stmt = conn.prepare("SELECT name, description, updated_at, config FROM presets ORDER BY name COLLATE NOCASE")?;
        let rows = stmt.query_map([], |r| {
            let config: String = r.get(3)?;
            let config: Value = serde_json::from_str(&config).unwrap_or(Value::Null);
            let text = |k: &str| config.get(k).and_then(Value::as_str).unwrap_or("").to_string();
            Ok(PresetSummary {
                name: r.get(0)?,
                description: r.get(1)?,
                updated_at: r.get(2)?,
                algo: text("network_algo"),
                family: text("model_family"),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    pub fn get(&self, name: &str) -> Result<Preset, PresetError> {
        let conn = self.db.conn();
        let row = conn
            .query_row(
                "SELECT name, description, config, created_at, updated_at FROM presets WHERE name = ?1",
                params![name],
                |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?, r.get::<_, String>(4)?)),
            )
            .optional()?;
        let Some((name, description, config, created_at, updated_at)) = row else {
            return Err(PresetError::NotFound(name.to_string()));
        };
        let stored: Config = serde_json::from_str(&config).unwrap_or_default();
        // Resolve against the current registry: fields added since it was saved get their defaults,
        // fields since removed are dropped.
        let known: Config = stored.into_iter().filter(|(k, _)| self.registry.field(k).is_some()).collect();
        Ok(Preset { name, description, config: self.registry.resolve(&known), created_at, updated_at })
    }

    /// Creates a preset; fails if the name is taken or the configuration is invalid.
    pub fn create(&self, name: &str, config: &Config, description: &str) -> Result<String, PresetError> {
        let name = check_name(name)?;
        let config = validated(self.registry, config)?;
        let conn = self.db.conn();
        let inserted = conn.execute(
            "INSERT INTO presets (name, config, description) VALUES (?1, ?2, ?3) ON CONFLICT(name) DO NOTHING",
            params![name, serde_json::to_string(&config).expect("JSON"), description],
        )?;
        if inserted == 0 {
            return Err(PresetError::Exists(name));
        }
        Ok(name)
    }

    /// Creates or replaces a preset. Returns true when it was created.
    pub fn put(&self, name: &str, config: &Config) -> Result<bool, PresetError> {
        let name = check_name(name)?;
        let config = validated(self.registry, config)?;
        let json = serde_json::to_string(&config).expect("JSON");
        let conn = self.db.conn();
        let updated = conn.execute(
            "UPDATE presets SET config = ?2, updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE name = ?1",
            params![name, json],
        )?;
        if updated == 1 {
            return Ok(false);
        }
        conn.execute("INSERT INTO presets (name, config) VALUES (?1, ?2)", params![name, json])?;
        Ok(true)
    }

    pub fn delete(&self, name: &str) -> Result<(), PresetError> {
        let deleted = self.db.conn().execute("DELETE FROM presets WHERE name = ?1", params![name])?;
        if deleted == 0 {
            return Err(PresetError::NotFound(name.to_string()));
        }
        Ok(())
    }

    pub fn rename(&self, from: &str, to: &str) -> Result<String, PresetError> {
        let to = check_name(to)?;
        let conn = self.db.conn();
        let exists: bool = conn.query_row("SELECT EXISTS(SELECT 1 FROM presets WHERE name = ?1)", params![to], |r| r.get(0))?;
        if exists && to != from {
            return Err(PresetError::Exists(to));
        }
        let changed = conn.execute(
            "UPDATE presets SET name = ?2, updated_at = strftime('%Y-%m-%dT%H:%M:%SZ', 'now') WHERE name = ?1",
            params![from, to],
        )?;
        if changed == 0 {
            return Err(PresetError::NotFound(from.to_string()));
        }
        Ok(to)
    }

    /// Copies a preset under the first free name "NAME (copy)", "NAME (copy 2)", …
    pub fn duplicate(&self, name: &str) -> Result<String, PresetError> {
        let preset = self.get(name)?;
        let taken: Vec<String> = self.list()?.into_iter().map(|p| p.name).collect();
        let base: String = name.chars().take(50).collect();
        let new_name = (1..)
            .map(|i| if i == 1 { format!("{base} (copy)") } else { format!("{base} (copy {i})") })
            .find(|n| !taken.contains(n))
            .expect("an unbounded range has a free name");
        self.create(&new_name, &preset.config, &format!("copy of {name}"))
    }
}
