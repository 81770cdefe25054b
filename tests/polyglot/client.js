#!/usr/bin/env node
// A Node.js client of the gateway's gRPC API, built only from the .proto files: it
// shows that a non-Python client can use the contract, and lets tests check that.
//
// Usage:
//   node tests/polyglot/client.js ADDRESS [--model provider/model] [--token T] [--timeout SECONDS]
//   node tests/polyglot/client.js --check
//
// With ADDRESS (e.g. 127.0.0.1:50051) it calls StatusService.GetStatus,
// StatusService.ListModels, ChatService.CreateChatCompletion and
// ChatService.StreamChatCompletion, then prints one JSON object on stdout:
//   {"status": {"available", "code", "error"}, "models": [ids],
//    "chat": {"id", "model", "content", "finish_reason", "usage"},
//    "stream": {"content", "chunks", "finish_reason"}}
// On an RPC error it prints {"error": {"code", "status", "details", "method"}} and
// exits 1; on bad arguments it prints the usage on stderr and exits 2.
// With --check it only loads the service definitions and prints
// {"services": [full service names]}.
'use strict';

const path = require('node:path');

const ROOT = path.resolve(__dirname, '..', '..');
// Resolved from the repository's node_modules whatever the working directory.
const grpc = require(path.join(ROOT, 'node_modules', '@grpc', 'grpc-js'));
const protoLoader = require(path.join(ROOT, 'node_modules', '@grpc', 'proto-loader'));

const PROTO_DIR = path.join(ROOT, 'protos');
const PROTO_FILES = ['chat', 'status', 'embedding', 'image', 'audio', 'admin'].map(
  (name) => `aigne/hub/v1/${name}_service.proto`,
);
const PACKAGE = 'aigne.hub.v1';
const USAGE =
  'usage: client.js ADDRESS [--model provider/model] [--token T] [--timeout SECONDS]\n' +
  '       client.js --check';

// keepCase keeps the protos' snake_case field names (finish_reason, tool_calls), as
// in the REST API. google/protobuf/*.proto are not in PROTO_DIR: proto-loader takes
// them from protobufjs's bundled definitions, whose field names are camelCase
// whatever keepCase says. So a google.protobuf.Value is written
// {stringValue: 'text'} (or nullValue, numberValue, boolValue, structValue,
// listValue) and read back with a `kind` naming the set field (oneofs: true).
const LOADER_OPTIONS = {
  includeDirs: [PROTO_DIR],
  keepCase: true,
  longs: String,
  enums: String,
  defaults: true,
  oneofs: true,
};

function loadPackage() {
  const definition = protoLoader.loadSync(PROTO_FILES, LOADER_OPTIONS);
  const services = Object.keys(definition)
    .filter((name) => name.startsWith(`${PACKAGE}.`) && !('format' in definition[name]))
    .sort();
  return { services, pkg: grpc.loadPackageDefinition(definition).aigne.hub.v1 };
}

/** Parses argv into {address, model, token, timeout, check}; throws on bad input. */
function parseArgs(argv) {
  const options = { address: null, model: 'openai/gpt-4o-mini', token: null, timeout: 30, check: false };
  const flags = { '--model': 'model', '--token': 'token', '--timeout': 'timeout' };
  for (let i = 0; i < argv.length; i += 1) {
    const arg = argv[i];
    if (arg === '--check') {
      options.check = true;
    } else if (arg in flags) {
      if (i + 1 >= argv.length) throw new Error(`${arg} needs a value`);
      options[flags[arg]] = argv[(i += 1)];
    } else if (!arg.startsWith('--') && options.address === null) {
      options.address = arg;
    } else {
      throw new Error(`unexpected argument: ${arg}`);
    }
  }
  options.timeout = Number(options.timeout);
  if (!(options.timeout > 0)) throw new Error('--timeout must be a positive number of seconds');
  if (!options.check && !options.address) throw new Error('ADDRESS is required');
  return options;
}

/** A failed RPC, remembering which method failed. */
class RpcFailure extends Error {
  constructor(method, error) {
    super(error.details || error.message);
    this.method = method;
    this.grpcError = error;
  }
}

/** Calls the unary `method` of `client`; resolves with the response message. */
function unary(client, method, request, metadata, deadlineSeconds) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: deadlineFrom(deadlineSeconds) }, (error, response) =>
      error ? reject(new RpcFailure(method, error)) : resolve(response),
    );
  });
}

/** Calls the server-streaming `method`; resolves with every message received. */
function serverStream(client, method, request, metadata, deadlineSeconds) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client[method](request, metadata, { deadline: deadlineFrom(deadlineSeconds) });
    call.on('data', (message) => messages.push(message));
    call.on('error', (error) => reject(new RpcFailure(method, error)));
    call.on('end', () => resolve(messages));
  });
}

function deadlineFrom(seconds) {
  return new Date(Date.now() + seconds * 1000);
}

function chatRequest(model) {
  return { model, messages: [{ role: 'user', content: { stringValue: 'hello from node' } }] };
}

function summarizeStream(chunks) {
  let content = '';
  let finishReason = null;
  for (const chunk of chunks) {
    for (const choice of chunk.choices) {
      content += choice.delta?.content ?? '';
      finishReason = choice.finish_reason ?? finishReason;
    }
  }
  return { content, chunks: chunks.length, finish_reason: finishReason };
}

async function run(options, pkg) {
  const credentials = grpc.credentials.createInsecure();
  const status = new pkg.StatusService(options.address, credentials);
  const chat = new pkg.ChatService(options.address, credentials);
  const metadata = new grpc.Metadata();
  if (options.token) metadata.set('authorization', `Bearer ${options.token}`);
  const call = (client, method, request) => unary(client, method, request, metadata, options.timeout);
  try {
    const health = await call(status, 'GetStatus', {});
    const catalog = await call(status, 'ListModels', {});
    const completion = await call(chat, 'CreateChatCompletion', chatRequest(options.model));
    const chunks = await serverStream(chat, 'StreamChatCompletion', chatRequest(options.model), metadata, options.timeout);
    const [choice] = completion.choices;
    return {
      status: { available: health.available, code: health.code, error: health.error },
      models: catalog.data.map((model) => model.id),
      chat: {
        id: completion.id,
        model: completion.model,
        content: choice?.message?.content ?? null,
        finish_reason: choice?.finish_reason ?? null,
        usage: completion.usage,
      },
      stream: summarizeStream(chunks),
    };
  } finally {
    status.close();
    chat.close();
  }
}

function printError(failure) {
  const error = failure.grpcError;
  const body = {
    code: error.code,
    status: grpc.status[error.code] ?? 'UNKNOWN',
    details: error.details,
    method: failure.method,
  };
  process.stdout.write(`${JSON.stringify({ error: body })}\n`);
}

async function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (error) {
    process.stderr.write(`${error.message}\n${USAGE}\n`);
    return 2;
  }
  const { services, pkg } = loadPackage();
  if (options.check) {
    process.stdout.write(`${JSON.stringify({ services })}\n`);
    return 0;
  }
  try {
    process.stdout.write(`${JSON.stringify(await run(options, pkg))}\n`);
    return 0;
  } catch (failure) {
    if (!(failure instanceof RpcFailure)) throw failure;
    printError(failure);
    return 1;
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error) => {
    process.stderr.write(`${error.stack || error}\n`);
    process.exitCode = 1;
  },
);
