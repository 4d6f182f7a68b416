-- A2A agent cards (issue 13): what a card says about an agent beyond its name and skills
-- (description, version, provider, its own A2A URL), as one JSON object. Skills gained
-- examples and input/output modes inside their existing JSON; older skills read as empty.
ALTER TABLE agents ADD COLUMN card jsonb NOT NULL DEFAULT '{}';
