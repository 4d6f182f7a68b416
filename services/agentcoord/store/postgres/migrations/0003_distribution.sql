-- Distribution: tasks and their sub-tasks. body is the record's snapshot (Task.to_snapshot,
-- Subtask.to_snapshot), from which the store rebuilds it; the other columns copy fields of
-- the body for indexes and filters. Ids sort by code point ("C"), as Python and SQLite
-- sort strings.

-- request_id is the submitter's idempotency key ('' for none); create_time orders ListTasks
-- (newest first, then task_id).
CREATE TABLE tasks (
    task_id text COLLATE "C" PRIMARY KEY,
    state text NOT NULL,
    submitter_agent_id text NOT NULL,
    request_id text NOT NULL,
    create_time timestamptz NOT NULL,
    body jsonb NOT NULL
);
CREATE UNIQUE INDEX tasks_request_id ON tasks (request_id) WHERE request_id <> '';
CREATE INDEX tasks_create_time ON tasks (create_time, task_id);
CREATE INDEX tasks_state_create_time ON tasks (state, create_time, task_id);
CREATE INDEX tasks_submitter_create_time ON tasks (submitter_agent_id, create_time, task_id);

-- seq is the position within the task; lease_agent_id the lease holder while LEASED, else ''.
CREATE TABLE subtasks (
    subtask_id text COLLATE "C" PRIMARY KEY,
    task_id text COLLATE "C" NOT NULL,
    seq integer NOT NULL,
    state text NOT NULL,
    lease_agent_id text NOT NULL,
    body jsonb NOT NULL
);
CREATE INDEX subtasks_task_seq ON subtasks (task_id, seq);
CREATE INDEX subtasks_open ON subtasks (state) WHERE state IN ('ready', 'leased');
CREATE INDEX subtasks_lease_agent ON subtasks (lease_agent_id) WHERE state = 'leased';
