-- The job queue. A job's `config` is the resolved registry configuration, validated and
-- snapshotted when it was queued: editing a preset or the form later never changes a queued job.
-- Order: higher `priority` first, then smaller `seq` (reordering rewrites `seq`).
-- Ownership of a running job is its lease (`lease` token + `lease_expires_ms`), never a PID:
-- a worker that stops renewing loses the job, which becomes claimable again and resumes.
CREATE TABLE jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    name             TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'queued'
                     CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    config           TEXT NOT NULL,
    priority         INTEGER NOT NULL DEFAULT 0,
    seq              INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL DEFAULT 3 CHECK (max_attempts >= 1),
    -- Claims ever made (not reset by a retry): a job claimed before resumes from its checkpoint.
    runs             INTEGER NOT NULL DEFAULT 0,
    worker           TEXT NOT NULL DEFAULT '',
    lease            TEXT,
    lease_expires_ms INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    step             INTEGER NOT NULL DEFAULT 0,
    total_steps      INTEGER NOT NULL DEFAULT 0,
    epoch            INTEGER NOT NULL DEFAULT 0,
    total_epochs     INTEGER NOT NULL DEFAULT 0,
    loss             REAL,
    it_per_sec       REAL,
    eta_secs         REAL,
    error            TEXT NOT NULL DEFAULT '',
    created_at       TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    started_at       TEXT,
    finished_at      TEXT
);
CREATE INDEX jobs_in_order ON jobs (state, priority DESC, seq);
-- New jobs go after MAX(seq): an index keeps that a lookup, not a scan.
CREATE INDEX jobs_by_seq ON jobs (seq);

-- Everything a job reports, in order: the engine's events and the queue's state changes.
-- The row id is the SSE event id, so a reconnecting browser resumes exactly where it stopped.
-- `lease` + `seq` identify an event posted by a worker, so a retried post is not stored twice.
CREATE TABLE job_events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id  INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind    TEXT NOT NULL,
    payload TEXT NOT NULL,
    time    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    lease   TEXT,
    seq     INTEGER
);
CREATE INDEX job_events_by_job ON job_events (job_id, id);
CREATE UNIQUE INDEX job_events_once ON job_events (lease, seq) WHERE lease IS NOT NULL;

-- Files a job produced: network files (epoch, step, final), training states and sample images.
-- `kept`: the user chose to keep this file; a copy lives outside the job's folder and survives
-- pruning and deleting the job.
CREATE TABLE artifacts (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     INTEGER NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    kind       TEXT NOT NULL CHECK (kind IN ('epoch', 'step', 'final', 'state', 'sample')),
    path       TEXT NOT NULL,
    step       INTEGER NOT NULL DEFAULT 0,
    epoch      INTEGER NOT NULL DEFAULT 0,
    label      TEXT NOT NULL DEFAULT '',
    pruned     INTEGER NOT NULL DEFAULT 0,
    kept       TEXT,
    created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
CREATE INDEX artifacts_by_job ON artifacts (job_id, id);
