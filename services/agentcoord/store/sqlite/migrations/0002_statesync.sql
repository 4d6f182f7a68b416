-- StateSync (issue 3). Keys sort by code point: SQLite's default BINARY collation
-- compares UTF-8 bytes, which is code point order, so a prefix is an index range.

-- The compact revision: the highest revision compaction dropped from the change log.
ALTER TABLE revision_counter ADD COLUMN compact_revision INTEGER NOT NULL DEFAULT 0;

-- Change log filters (ListEvents, WatchEvents) and compaction by time.
CREATE INDEX changes_kind_revision ON changes (kind, revision);
CREATE INDEX changes_time ON changes (time);

-- The current entry of every key. data is the value's bytes (kind: json or binary);
-- metadata is JSON text; times are ISO 8601 text in UTC. session_epoch > 0 binds the key
-- to that session of agent_id (deleted when it ends); expire_time NULL means no TTL.
CREATE TABLE states (
    key TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    data BLOB NOT NULL,
    metadata TEXT NOT NULL,
    version INTEGER NOT NULL,
    create_revision INTEGER NOT NULL,
    mod_revision INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    create_time TEXT NOT NULL,
    update_time TEXT NOT NULL,
    expire_time TEXT,
    session_epoch INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX states_expire_time ON states (expire_time) WHERE expire_time IS NOT NULL;
CREATE INDEX states_agent_session ON states (agent_id, session_epoch) WHERE session_epoch > 0;

-- Results of committed state writes by (agent, request id), so that a retried write whose
-- first attempt committed returns the first result instead of applying twice. result is
-- JSON text; rows older than the change log's retention are dropped with it.
CREATE TABLE write_requests (
    agent_id TEXT NOT NULL,
    request_id TEXT NOT NULL,
    result TEXT NOT NULL,
    time TEXT NOT NULL,
    PRIMARY KEY (agent_id, request_id)
);
CREATE INDEX write_requests_time ON write_requests (time);
