-- StateSync (issue 3).

-- The compact revision: the highest revision compaction dropped from the change log.
ALTER TABLE revision_counter ADD COLUMN compact_revision bigint NOT NULL DEFAULT 0;

-- Change log filters (ListEvents, WatchEvents) and compaction by time. kind and subject
-- sort by code point ("C"), whatever the database's collation, so that a prefix (a kind
-- family such as "agent.", a key prefix) is an index range.
ALTER TABLE changes
    ALTER COLUMN kind TYPE text COLLATE "C",
    ALTER COLUMN subject TYPE text COLLATE "C";
CREATE INDEX changes_kind_revision ON changes (kind, revision);
CREATE INDEX changes_time ON changes (time);

-- The current entry of every key, keys in code point order ("C"). data is the value's
-- bytes (kind: json or binary). session_epoch > 0 binds the key to that session of
-- agent_id (deleted when it ends); expire_time NULL means no TTL.
CREATE TABLE states (
    key text COLLATE "C" PRIMARY KEY,
    kind text NOT NULL,
    data bytea NOT NULL,
    metadata jsonb NOT NULL,
    version bigint NOT NULL,
    create_revision bigint NOT NULL,
    mod_revision bigint NOT NULL,
    agent_id text NOT NULL,
    create_time timestamptz NOT NULL,
    update_time timestamptz NOT NULL,
    expire_time timestamptz,
    session_epoch bigint NOT NULL DEFAULT 0
);
CREATE INDEX states_expire_time ON states (expire_time) WHERE expire_time IS NOT NULL;
CREATE INDEX states_agent_session ON states (agent_id, session_epoch) WHERE session_epoch > 0;

-- Results of committed state writes by (agent, request id), so that a retried write whose
-- first attempt committed returns the first result instead of applying twice. Rows older
-- than the change log's retention are dropped with it.
CREATE TABLE write_requests (
    agent_id text NOT NULL,
    request_id text NOT NULL,
    result jsonb NOT NULL,
    time timestamptz NOT NULL,
    PRIMARY KEY (agent_id, request_id)
);
CREATE INDEX write_requests_time ON write_requests (time);
