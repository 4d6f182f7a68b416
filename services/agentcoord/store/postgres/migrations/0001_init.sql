-- Store-wide revision counter: one row, incremented inside each writing transaction.
-- Its row lock makes concurrent writers commit in revision order.
CREATE TABLE revision_counter (
    id integer PRIMARY KEY CHECK (id = 1),
    value bigint NOT NULL
);
INSERT INTO revision_counter (id, value) VALUES (1, 0);

-- Change log of every service.
CREATE TABLE changes (
    revision bigint PRIMARY KEY,
    time timestamptz NOT NULL,
    service text NOT NULL,
    kind text NOT NULL,
    subject text NOT NULL,
    agent_id text NOT NULL,
    details jsonb NOT NULL
);
CREATE INDEX changes_service_revision ON changes (service, revision);
CREATE INDEX changes_agent_id_revision ON changes (agent_id, revision);
CREATE INDEX changes_subject_revision ON changes (subject, revision);

-- Discovery: agents and their current session. agent_id sorts by code point ("C"),
-- as Python and SQLite sort strings.
CREATE TABLE agents (
    agent_id text COLLATE "C" PRIMARY KEY,
    name text NOT NULL,
    role text NOT NULL,
    capabilities jsonb NOT NULL,
    capacity integer NOT NULL,
    labels jsonb NOT NULL,
    skills jsonb NOT NULL,
    ttl double precision NOT NULL,
    state text NOT NULL,
    epoch bigint NOT NULL,
    status text NOT NULL,
    active_subtasks integer NOT NULL,
    held_subtask_ids jsonb NOT NULL,
    register_time timestamptz,
    last_heartbeat_time timestamptz,
    revision bigint NOT NULL,
    token_hash text NOT NULL
);
CREATE INDEX agents_token_hash ON agents (token_hash);
