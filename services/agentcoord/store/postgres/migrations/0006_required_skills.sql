-- Skill requirements (issue 13): a task and each of its sub-tasks name the skills (A2A skill
-- ids or tags) an agent must offer to be assigned the work. Records written before require
-- none.
UPDATE tasks SET body = jsonb_set(body, '{required_skills}', '[]'::jsonb);
UPDATE subtasks SET body = jsonb_set(body, '{required_skills}', '[]'::jsonb);
