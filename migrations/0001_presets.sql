-- Saved configurations. `config` is the resolved configuration (every registry key) as JSON,
-- written only after validation.
CREATE TABLE presets (
    name       TEXT PRIMARY KEY NOT NULL,
    config     TEXT NOT NULL,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);

-- Small server-side settings (UI preferences, secrets stored masked on display).
CREATE TABLE settings (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
);
