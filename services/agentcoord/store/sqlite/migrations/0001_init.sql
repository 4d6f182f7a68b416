-- Store-wide revision counter: one row, incremented inside each writing transaction.
CREATE TABLE revision_counter (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    value INTEGER NOT NULL
);
INSERT INTO revision_counter (id, value) VALUES (1, 0);

-- Change log of every service; details is JSON text. Times are ISO 8601 text in UTC.
CREATE TABLE changes (
    revision INTEGER PRIMARY KEY,
    time TEXT NOT NULL,
    service TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    details TEXT NOT NULL
);
CREATE INDEX changes_service_revision ON changes (service, revision);
CREATE INDEX changes_agent_id_revision ON changes (agent_id, revision);
CREATE INDEX changes_subject_revision ON changes (subject, revision);

-- Discovery: agents and their current session. capabilities, labels, skills and
-- held_subtask_ids are JSON text.
CREATE TABLE agents (
    agent_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    labels TEXT NOT NULL,
    skills TEXT NOT NULL,
    ttl REAL NOT NULL,
    state TEXT NOT NULL,
    epoch INTEGER NOT NULL,
    status TEXT NOT NULL,
    active_subtasks INTEGER NOT NULL,
    held_subtask_ids TEXT NOT NULL,
    register_time TEXT,
    last_heartbeat_time TEXT,
    revision INTEGER NOT NULL,
    token_hash TEXT NOT NULL
);
CREATE INDEX agents_token_hash ON agents (token_hash);
