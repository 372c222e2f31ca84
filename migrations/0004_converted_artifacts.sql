-- A job's files may now include plain LoRAs converted from its network files after the run
-- ("Convert to LoRA…" on the job page): artifacts get the kind 'converted'. SQLite cannot change
-- a CHECK constraint in place, so the table is rebuilt with its rows, ids and index.
CREATE TABLE artifacts_new (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind       TEXT NOT NULL CHECK (kind IN ('epoch', 'step', 'final', 'state', 'sample', 'converted')),
    path       TEXT NOT NULL,
    step       INTEGER NOT NULL DEFAULT 0,
    epoch      INTEGER NOT NULL DEFAULT 0,
    label      TEXT NOT NULL DEFAULT '',
    pruned     INTEGER NOT NULL DEFAULT 0,
    kept       TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
INSERT INTO artifacts_new (id, job_id, kind, path, step, epoch, label, pruned, kept, created_at)
    SELECT id, job_id, kind, path, step, epoch, label, pruned, kept, created_at FROM artifacts;
DROP TABLE artifacts;
ALTER TABLE artifacts_new RENAME TO artifacts;
CREATE INDEX artifacts_by_job ON artifacts (job_id, id);
