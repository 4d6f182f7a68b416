#!/usr/bin/env node
// A Node client that knows nothing but the server's address: every type comes from server
// reflection (grpc.reflection.v1), turned into protobufjs 8 types. No .proto files, no codegen.
//
// It registers an agent with labels (a map field), submits an EXPLICIT task whose sub-task
// input is JSON (a google.protobuf.Value), reads the task back, deregisters, and prints each
// step as one JSON line. Messages are written and read in the proto JSON mapping with
// protobufjs/ext/protojson, as grpcurl shows them: lowerCamelCase names, enums by name,
// durations as "10s", a Value as plain JSON.
//
// protobufjs 7, which @grpc/proto-loader uses, cannot encode the map fields of reflected
// descriptors (see docs/other-languages.md); agent.js loads the .proto files instead.
//
// Usage: node reflection-client.js [ADDRESS]
//   ADDRESS  host:port of the server; else $AGENTCOORD_SERVER, else 127.0.0.1:50051
'use strict';

const grpc = require('@grpc/grpc-js');
const protobuf = require('protobufjs'); // 8.x, from the root package.json
const descriptor = require('protobufjs/ext/descriptor');
const protojson = require('protobufjs/ext/protojson');

const address = process.argv[2] || process.env.AGENTCOORD_SERVER || '127.0.0.1:50051';
const agentId = `node-reflection-${process.pid}`;
const SERVICES = ['agentcoord.discovery.v1.DiscoveryService', 'agentcoord.distribution.v1.DistributionService'];

function log(event, fields = {}) {
  process.stdout.write(`${JSON.stringify({ event, ...fields })}\n`);
}

// The three reflection messages this client needs, by field number (the reflection service
// cannot describe itself before it can be asked).
const reflection = protobuf.Root.fromJSON({
  nested: {
    Request: { fields: { fileContainingSymbol: { type: 'string', id: 4 } } },
    Response: {
      fields: { fileDescriptorResponse: { type: 'FileDescriptorResponse', id: 4 }, errorResponse: { type: 'ErrorResponse', id: 7 } },
    },
    FileDescriptorResponse: { fields: { fileDescriptorProto: { rule: 'repeated', type: 'bytes', id: 1 } } },
    ErrorResponse: { fields: { errorCode: { type: 'int32', id: 1 }, errorMessage: { type: 'string', id: 2 } } },
  },
});
const [ReflectionRequest, ReflectionResponse] = ['Request', 'Response'].map((name) => reflection.lookupType(name));

// One reflection stream: the files declaring `symbols`, with everything they import.
function reflectedFiles(client, symbols) {
  return new Promise((resolve, reject) => {
    const call = client.makeBidiStreamRequest(
      '/grpc.reflection.v1.ServerReflection/ServerReflectionInfo',
      (message) => Buffer.from(ReflectionRequest.encode(message).finish()),
      (bytes) => ReflectionResponse.decode(bytes),
    );
    const files = new Map();
    call.on('data', (response) => {
      if (response.errorResponse) {
        reject(new Error(`reflection: ${response.errorResponse.errorMessage}`));
        return;
      }
      for (const bytes of response.fileDescriptorResponse.fileDescriptorProto) {
        const file = descriptor.FileDescriptorProto.decode(bytes);
        files.set(file.name, file);
      }
    });
    call.on('error', reject);
    call.on('end', () => resolve([...files.values()]));
    for (const symbol of symbols) call.write(ReflectionRequest.create({ fileContainingSymbol: symbol }));
    call.end();
  });
}

// A unary call of `Service/Method`: the request from JSON, the response to JSON.
function caller(client, root) {
  return (service, method, json, metadata = new grpc.Metadata()) => {
    const rpc = root.lookupService(service).methods[method].resolve();
    const [requestType, responseType] = [rpc.resolvedRequestType, rpc.resolvedResponseType];
    return new Promise((resolve, reject) => {
      client.makeUnaryRequest(
        `/${service}/${method}`,
        (message) => Buffer.from(requestType.encode(message).finish()),
        (bytes) => responseType.decode(bytes),
        protojson.fromJson(requestType, json),
        metadata,
        { deadline: new Date(Date.now() + 10_000) },
        (error, response) => (error ? reject(error) : resolve(protojson.toJson(responseType, response))),
      );
    });
  };
}

async function main() {
  const client = new grpc.Client(address, grpc.credentials.createInsecure());
  try {
    const files = await reflectedFiles(client, SERVICES);
    const root = protobuf.Root.fromDescriptor(descriptor.FileDescriptorSet.create({ file: files }));
    log('reflected', { files: files.map((file) => file.name).sort() });
    const call = caller(client, root);

    const registered = await call('agentcoord.discovery.v1.DiscoveryService', 'Register', {
      agentId,
      name: 'Node reflection client',
      capabilities: ['node'],
      labels: { runtime: 'node', descriptors: 'reflection' },
    });
    log('registered', { agent_id: registered.agent.agentId, labels: registered.agent.labels, ttl: registered.ttl });

    const input = { words: ['map', 'struct'], count: 2, nested: { ok: true }, nothing: null };
    const submitted = await call('agentcoord.distribution.v1.DistributionService', 'SubmitTask', {
      task: { title: 'from reflection', splitPolicy: 'SPLIT_POLICY_EXPLICIT', subtasks: [{ localId: 'only', title: 'only', input }] },
    });
    const { task } = await call('agentcoord.distribution.v1.DistributionService', 'GetTask', {
      taskId: submitted.task.taskId,
    });
    log('task', { task_id: task.taskId, state: task.state, input: task.subtasks[0].input });

    const auth = new grpc.Metadata();
    auth.set('authorization', `Bearer ${registered.sessionToken}`);
    const left = await call('agentcoord.discovery.v1.DiscoveryService', 'Deregister', { agentId }, auth);
    log('deregistered', { state: left.agent.state });
  } finally {
    client.close();
  }
}

main().then(
  () => process.exit(0),
  (error) => {
    log('error', { code: error.code, details: error.details || String(error) });
    process.exit(1);
  },
);
