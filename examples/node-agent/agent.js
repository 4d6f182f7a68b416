#!/usr/bin/env node
// A minimal agentcoord worker in Node, using @grpc/grpc-js and @grpc/proto-loader.
//
// It registers, keeps a Heartbeat stream open (naming the sub-tasks it holds), claims one
// sub-task, completes it with the lease's fencing token, deregisters and exits 0. Every
// step is printed as one JSON line on stdout.
//
// Usage: node agent.js [ADDRESS] [CAPABILITY]
//   ADDRESS     host:port of the server; else $AGENTCOORD_SERVER, else 127.0.0.1:50051
//   CAPABILITY  capability to register with; else $AGENTCOORD_CAPABILITY, else "node"
// Optional environment: AGENTCOORD_AGENT_ID (default node-agent-<pid>),
//   AGENTCOORD_JOIN_TOKEN (sent as x-agentcoord-join-token on Register),
//   AGENTCOORD_CLAIM_WAIT (seconds to wait for a sub-task, default 10, at most 60).
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTOS = path.resolve(__dirname, '..', '..', 'protos');

// keepCase: field names exactly as in the .proto files (agent_id, session_token, ...).
// longs: String, so int64 fields such as fencing_token survive untouched.
// enums: String everywhere ("COMMAND_REREGISTER", "STATE_SUCCEEDED", ...).
// oneofs: true adds a virtual field naming the set member, e.g. Value.kind === "string_value".
// The google/protobuf well-known types (Duration, Timestamp, Struct/Value) ship with
// protobufjs, so only the project's protos directory is needed as an include dir.
const definition = protoLoader.loadSync(
  [
    'agentcoord/discovery/v1/discovery_service.proto',
    'agentcoord/distribution/v1/distribution_service.proto',
  ],
  { keepCase: true, longs: String, enums: String, defaults: true, oneofs: true, includeDirs: [PROTOS] },
);
const proto = grpc.loadPackageDefinition(definition);
const { DiscoveryService } = proto.agentcoord.discovery.v1;
const { DistributionService } = proto.agentcoord.distribution.v1;

const address = process.argv[2] || process.env.AGENTCOORD_SERVER || '127.0.0.1:50051';
const capability = process.argv[3] || process.env.AGENTCOORD_CAPABILITY || 'node';
const agentId = process.env.AGENTCOORD_AGENT_ID || `node-agent-${process.pid}`;
const claimWait = Math.min(Number(process.env.AGENTCOORD_CLAIM_WAIT || 10), 60);

function log(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, agent_id: agentId, ...fields })}\n`);
}

// Duration <-> seconds. With longs: String, `seconds` is a string on the way in.
function toSeconds(duration) {
  return duration ? Number(duration.seconds) + duration.nanos / 1e9 : 0;
}
function duration(seconds) {
  const whole = Math.floor(seconds);
  return { seconds: String(whole), nanos: Math.round((seconds - whole) * 1e9) };
}

// google.protobuf.Value from a plain JSON value. Value is a oneof (`kind`) of nullValue,
// numberValue, stringValue, boolValue, structValue ({fields: {k: Value}}) and listValue
// ({values: [...]}). Careful: the well-known types come from protobufjs's bundled
// definitions, whose field names are camelCase even with keepCase: true; a snake_case
// key such as string_value is silently dropped and the server receives JSON null.
function toValue(data) {
  if (data === null || data === undefined) return { nullValue: 'NULL_VALUE' };
  if (typeof data === 'number') return { numberValue: data };
  if (typeof data === 'string') return { stringValue: data };
  if (typeof data === 'boolean') return { boolValue: data };
  if (Array.isArray(data)) return { listValue: { values: data.map(toValue) } };
  const fields = {};
  for (const [key, item] of Object.entries(data)) fields[key] = toValue(item);
  return { structValue: { fields } };
}

// Plain JSON from a google.protobuf.Value as decoded with oneofs: true (kind names the member).
function fromValue(value) {
  if (!value || !value.kind || value.kind === 'nullValue') return null;
  if (value.kind === 'structValue') {
    const out = {};
    for (const [key, item] of Object.entries(value.structValue.fields || {})) out[key] = fromValue(item);
    return out;
  }
  if (value.kind === 'listValue') return (value.listValue.values || []).map(fromValue);
  return value[value.kind];
}

// Promise wrapper for a unary call.
function call(client, method, request, metadata, options = {}) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, options, (error, response) =>
      error ? reject(error) : resolve(response),
    );
  });
}

function deadline(seconds) {
  return { deadline: new Date(Date.now() + seconds * 1000) };
}

async function main() {
  const credentials = grpc.credentials.createInsecure();
  const discovery = new DiscoveryService(address, credentials);
  const distribution = new DistributionService(address, credentials);

  // 1. Register. A join token, when the server has one, goes in x-agentcoord-join-token.
  const joinMetadata = new grpc.Metadata();
  if (process.env.AGENTCOORD_JOIN_TOKEN) {
    joinMetadata.set('x-agentcoord-join-token', process.env.AGENTCOORD_JOIN_TOKEN);
  }
  const registered = await call(
    discovery,
    'Register',
    { agent_id: agentId, name: `Node agent ${agentId}`, role: 'worker', capabilities: [capability], capacity: 1 },
    joinMetadata,
    deadline(10),
  );
  const interval = toSeconds(registered.heartbeat_interval); // the server asks for ttl/3
  log('registered', {
    epoch: registered.epoch,
    ttl_seconds: toSeconds(registered.ttl),
    heartbeat_interval_seconds: interval,
  });

  // Every later call acts as this agent: authorization: Bearer <session_token>.
  const auth = new grpc.Metadata();
  auth.set('authorization', `Bearer ${registered.session_token}`);

  // 2. Heartbeat: one bidirectional stream; each message names the held sub-tasks,
  // which renews their leases.
  const held = new Set();
  const heartbeats = discovery.Heartbeat(auth);
  let closing = false;
  const streamClosed = new Promise((resolve) => heartbeats.on('status', resolve));
  heartbeats.on('data', (response) => {
    if (response.command === 'COMMAND_REREGISTER') log('session_ended', { command: response.command });
  });
  heartbeats.on('error', (error) => {
    if (!closing) log('heartbeat_error', { code: error.code, details: error.details });
  });
  const beat = () => {
    const ids = [...held];
    heartbeats.write({ agent_id: agentId, load: { active_subtasks: ids.length, held_subtask_ids: ids } });
  };
  beat();
  const timer = setInterval(beat, Math.max(interval, 0.05) * 1000);
  log('heartbeating', { every_seconds: interval });

  try {
    // 3. Claim one sub-task, waiting up to claimWait seconds for one to become READY.
    const claimed = await call(
      distribution,
      'ClaimSubtask',
      { agent_id: agentId, wait: duration(claimWait) },
      auth,
      deadline(claimWait + 10),
    );
    const assignment = claimed.assignment;
    if (!assignment) {
      log('no_work', { waited_seconds: claimWait });
    } else {
      const { subtask_id: subtaskId, fencing_token: fencingToken } = assignment.lease;
      held.add(subtaskId);
      beat();
      log('claimed', {
        subtask_id: subtaskId,
        task_id: assignment.subtask.task_id,
        title: assignment.subtask.title,
        input: fromValue(assignment.subtask.input),
        fencing_token: fencingToken,
        attempt: assignment.lease.attempt,
      });

      // 4. The "work": uppercase the title. Then complete with the lease's fencing token.
      const result = { title: assignment.subtask.title.toUpperCase(), agent_id: agentId };
      const completed = await call(
        distribution,
        'CompleteSubtask',
        { subtask_id: subtaskId, agent_id: agentId, fencing_token: fencingToken, result: toValue(result) },
        auth,
        deadline(10),
      );
      held.delete(subtaskId);
      log('completed', { subtask_id: subtaskId, result, task_state: completed.task_state });
    }
  } finally {
    // 5. Stop heartbeating, close the stream, then Deregister.
    clearInterval(timer);
    closing = true;
    heartbeats.end();
    await Promise.race([streamClosed, new Promise((resolve) => setTimeout(resolve, 2000))]);
  }
  const left = await call(discovery, 'Deregister', { agent_id: agentId }, auth, deadline(10));
  log('deregistered', { state: left.agent.state });
  discovery.close();
  distribution.close();
}

// Errors: the server's status carries a google.rpc.Status in the grpc-status-details-bin
// trailer, whose details hold a google.rpc.ErrorInfo (reason, domain "agentcoord",
// metadata). google/rpc protos are not in protos/, so the two messages needed are declared
// here; a placeholder service gives access to proto-loader's deserializers.
const rpcTypes = protoLoader.fromJSON(
  {
    nested: {
      google: {
        nested: {
          rpc: {
            nested: {
              Status: {
                fields: { code: { type: 'int32', id: 1 }, message: { type: 'string', id: 2 }, details: { rule: 'repeated', type: 'Any', id: 3 } },
              },
              Any: { fields: { type_url: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
              ErrorInfo: {
                fields: { reason: { type: 'string', id: 1 }, domain: { type: 'string', id: 2 }, metadata: { keyType: 'string', type: 'string', id: 3 } },
              },
              Decoder: {
                methods: {
                  Status: { requestType: 'Status', responseType: 'Status' },
                  ErrorInfo: { requestType: 'ErrorInfo', responseType: 'ErrorInfo' },
                },
              },
            },
          },
        },
      },
    },
  },
  { keepCase: true },
)['google.rpc.Decoder'];

function errorInfo(error) {
  const [bytes] = (error.metadata && error.metadata.get('grpc-status-details-bin')) || [];
  if (!bytes) return undefined;
  const status = rpcTypes.Status.responseDeserialize(bytes);
  const any = status.details.find((detail) => detail.type_url.endsWith('/google.rpc.ErrorInfo'));
  return any ? rpcTypes.ErrorInfo.responseDeserialize(any.value) : undefined;
}

main().then(
  () => process.exit(0),
  (error) => {
    const info = errorInfo(error);
    log('error', {
      code: error.code,
      details: error.details || String(error),
      ...(info && { reason: info.reason, domain: info.domain, metadata: info.metadata }),
    });
    process.exit(1);
  },
);
