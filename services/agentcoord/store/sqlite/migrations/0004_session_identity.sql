-- Identity (issue 9): a task records the identity that submitted it ('agent:<id>', 'admin',
-- or '' for a caller without one), request ids are unique per submitter instead of
-- globally, and a lease records the session (epoch) of its holder.
ALTER TABLE tasks ADD COLUMN submitter TEXT NOT NULL DEFAULT '';
UPDATE tasks SET submitter = 'agent:' || submitter_agent_id WHERE submitter_agent_id <> '';
UPDATE tasks SET body = json_set(body, '$.submitter', submitter);
DROP INDEX tasks_request_id;
CREATE UNIQUE INDEX tasks_submitter_request_id ON tasks (submitter, request_id)
    WHERE request_id <> '';

-- A lease held when this migration runs belongs to its agent's current session (0 when the
-- agent is unknown: no session holds it, so it is released).
UPDATE subtasks
SET body = json_set(
    body,
    '$.lease.epoch',
    coalesce((SELECT epoch FROM agents WHERE agents.agent_id = subtasks.lease_agent_id), 0)
)
WHERE json_type(body, '$.lease') = 'object';
