-- Sub-task progress in columns (issue 12): what a transition changes (state, attempts,
-- tokens, holder, result, failure, times, revision, and the lease field by field) has a
-- column of its own, so that a transition updates those columns and never re-encodes the
-- record; body keeps only what no transition changes (title, input, dependencies, ...).
-- The lease_* columns are NULL without a lease; lease_agent_id is its holder, else ''.
-- result is the canonical JSON text of the result, kept as text.
ALTER TABLE subtasks
    ADD COLUMN waiting_on integer NOT NULL DEFAULT 0,
    ADD COLUMN attempt integer NOT NULL DEFAULT 0,
    ADD COLUMN burned_attempts integer NOT NULL DEFAULT 0,
    ADD COLUMN fencing_token bigint NOT NULL DEFAULT 0,
    ADD COLUMN agent_id text COLLATE "C" NOT NULL DEFAULT '',
    ADD COLUMN result text,
    ADD COLUMN last_failure jsonb,
    ADD COLUMN next_attempt_time timestamptz,
    ADD COLUMN start_time timestamptz,
    ADD COLUMN end_time timestamptz,
    ADD COLUMN update_time timestamptz,
    ADD COLUMN revision bigint NOT NULL DEFAULT 0,
    ADD COLUMN lease_fencing_token bigint,
    ADD COLUMN lease_epoch bigint,
    ADD COLUMN lease_attempt integer,
    ADD COLUMN lease_expire_time timestamptz,
    ADD COLUMN lease_ttl float8,
    ADD COLUMN lease_claim_request_id text;

-- Rows written before: their progress moves out of body.
UPDATE subtasks SET
    waiting_on = (body ->> 'waiting_on')::integer,
    attempt = (body ->> 'attempt')::integer,
    burned_attempts = (body ->> 'burned_attempts')::integer,
    fencing_token = (body ->> 'fencing_token')::bigint,
    agent_id = body ->> 'agent_id',
    result = body ->> 'result',
    last_failure = NULLIF(body -> 'last_failure', 'null'::jsonb),
    next_attempt_time = (body ->> 'next_attempt_time')::timestamptz,
    start_time = (body ->> 'start_time')::timestamptz,
    end_time = (body ->> 'end_time')::timestamptz,
    update_time = (body ->> 'update_time')::timestamptz,
    revision = (body ->> 'revision')::bigint,
    lease_agent_id = coalesce(body #>> '{lease,agent_id}', ''),
    lease_fencing_token = (body #>> '{lease,fencing_token}')::bigint,
    lease_epoch = (body #>> '{lease,epoch}')::bigint,
    lease_attempt = (body #>> '{lease,attempt}')::integer,
    lease_expire_time = (body #>> '{lease,expire_time}')::timestamptz,
    lease_ttl = (body #>> '{lease,ttl}')::float8,
    lease_claim_request_id = CASE
        WHEN jsonb_typeof(body -> 'lease') = 'object'
        THEN coalesce(body #>> '{lease,claim_request_id}', '')
    END;
UPDATE subtasks SET body = body - ARRAY[
    'subtask_id', 'task_id', 'seq', 'state', 'waiting_on', 'attempt', 'burned_attempts',
    'fencing_token', 'agent_id', 'result', 'last_failure', 'next_attempt_time', 'start_time',
    'end_time', 'update_time', 'revision', 'lease'
];
ALTER TABLE subtasks ALTER COLUMN update_time SET NOT NULL;
