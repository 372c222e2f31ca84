-- The configuration being edited in a browser, kept on the server so that switching tabs or
-- reloading the page never loses an edit. `config` is sparse: only what differs from the defaults.
CREATE TABLE drafts (
    id         TEXT PRIMARY KEY NOT NULL,
    config     TEXT NOT NULL DEFAULT '{}',
    updated_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);

-- Where a preset came from, shown in the preset list.
ALTER TABLE presets ADD COLUMN description TEXT NOT NULL DEFAULT '';
