-- Sub-task progress in columns (issue 12): what a transition changes (state, attempts,
-- tokens, holder, result, failure, times, revision, and the lease field by field) has a
-- column of its own, so that a transition updates those columns and never re-encodes the
-- record; body keeps only what no transition changes (title, input, dependencies, ...).
-- The lease_* columns are NULL without a lease; lease_agent_id is its holder, else ''.
-- Times are ISO 8601 text in UTC, as elsewhere.
ALTER TABLE subtasks ADD COLUMN waiting_on INTEGER NOT NULL DEFAULT 0;
ALTER TABLE subtasks ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0;
ALTER TABLE subtasks ADD COLUMN burned_attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE subtasks ADD COLUMN fencing_token INTEGER NOT NULL DEFAULT 0;
ALTER TABLE subtasks ADD COLUMN agent_id TEXT NOT NULL DEFAULT '';
ALTER TABLE subtasks ADD COLUMN result TEXT;
ALTER TABLE subtasks ADD COLUMN last_failure TEXT;
ALTER TABLE subtasks ADD COLUMN next_attempt_time TEXT;
ALTER TABLE subtasks ADD COLUMN start_time TEXT;
ALTER TABLE subtasks ADD COLUMN end_time TEXT;
ALTER TABLE subtasks ADD COLUMN update_time TEXT NOT NULL DEFAULT '';
ALTER TABLE subtasks ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
ALTER TABLE subtasks ADD COLUMN lease_fencing_token INTEGER;
ALTER TABLE subtasks ADD COLUMN lease_epoch INTEGER;
ALTER TABLE subtasks ADD COLUMN lease_attempt INTEGER;
ALTER TABLE subtasks ADD COLUMN lease_expire_time TEXT;
ALTER TABLE subtasks ADD COLUMN lease_ttl REAL;
ALTER TABLE subtasks ADD COLUMN lease_claim_request_id TEXT;

-- Rows written before: their progress moves out of body.
UPDATE subtasks SET
    waiting_on = json_extract(body, '$.waiting_on'),
    attempt = json_extract(body, '$.attempt'),
    burned_attempts = json_extract(body, '$.burned_attempts'),
    fencing_token = json_extract(body, '$.fencing_token'),
    agent_id = json_extract(body, '$.agent_id'),
    result = json_extract(body, '$.result'),
    last_failure = json_extract(body, '$.last_failure'),
    next_attempt_time = json_extract(body, '$.next_attempt_time'),
    start_time = json_extract(body, '$.start_time'),
    end_time = json_extract(body, '$.end_time'),
    update_time = json_extract(body, '$.update_time'),
    revision = json_extract(body, '$.revision'),
    lease_agent_id = coalesce(json_extract(body, '$.lease.agent_id'), ''),
    lease_fencing_token = json_extract(body, '$.lease.fencing_token'),
    lease_epoch = json_extract(body, '$.lease.epoch'),
    lease_attempt = json_extract(body, '$.lease.attempt'),
    lease_expire_time = json_extract(body, '$.lease.expire_time'),
    lease_ttl = json_extract(body, '$.lease.ttl'),
    lease_claim_request_id = CASE
        WHEN json_type(body, '$.lease') = 'object'
        THEN coalesce(json_extract(body, '$.lease.claim_request_id'), '')
    END;
UPDATE subtasks SET body = json_remove(
    body,
    '$.subtask_id', '$.task_id', '$.seq', '$.state', '$.waiting_on', '$.attempt',
    '$.burned_attempts', '$.fencing_token', '$.agent_id', '$.result', '$.last_failure',
    '$.next_attempt_time', '$.start_time', '$.end_time', '$.update_time', '$.revision',
    '$.lease'
);
