// The upstream that idempo proxy's tests put the proxy in front of: an HTTP API in another
// language (Node, no npm packages), which records every execution and fails on request.
//
//   node tests/proxy/upstream/server.mjs --port 0 --ledger PATH [--host 127.0.0.1]
//
// On start it prints one line on stdout, a JSON object: {"port": N, "host": "...", "pid": N,
// "keep_alive_timeout_ms": 5000}; nothing else is written to stdout. Errors go to stderr.
//
// Every request to a path that does not start with "/_" is an execution: its body is read,
// one JSON line is appended to the ledger with appendFileSync (so it is on disk before the
// answer, and the count survives a crash of this process), then it answers 201 with a fresh
// random id. A ledger line holds:
//   time (ISO 8601), pid, id (the id answered), method, path (with the query), key (the
//   Idempotency-Key header as received, or null), attempt (the Idempo-Attempt header, or null),
//   faults (the X-Fault header, or null), body_bytes, body_sha256 (hex), content_length (the
//   header, or null), transfer_encoding (or null), headers (every request header as
//   [name, value] pairs, in order, repeated ones kept, names as sent).
// The answer's body is JSON {"id", "key", "attempt", "method", "path", "body_bytes",
// "body_sha256"}, with an X-Execution-Id header holding the id.
//
// Control paths (never executions, never in the ledger):
//   GET /_stats          {"pid", "connections" (TCP connections accepted), "api_connections"
//                        (those that carried a request outside /_: the connections a proxy
//                        opened, without the tests' own control calls), "requests",
//                        "executions" ({key: count} since this process started), "unkeyed"
//                        (executions without a key), "total", "waiting" (answers or chunks
//                        waiting for /_release), "keep_alive_timeout_ms"}
//   ANY /_echo-headers   {"method", "url", "http_version", "headers": [[name, value], ...]}:
//                        the request headers as received (order, case and repeats kept)
//   GET /_release[?n=N][&key=K]
//                        lets N (default 1) waiting answers or chunks go (see await-release and
//                        stream=N). With key=K, only those of requests whose Idempotency-Key is
//                        K; without, any (oldest first). A release that finds nobody waiting is
//                        kept as a credit for the next wait, so a test never races the server.
//
// Faults, chosen per request by the X-Fault header (comma-separated, combinable, applied in
// this order; an unknown fault answers 400 and is not executed):
//   reset-before-read    the connection is reset (TCP RST) before the body is read: no execution
//   delay=MS             the answer waits MS milliseconds after the execution is recorded
//   await-release        the answer waits for one /_release after the execution is recorded
//   crash-after-commit   the execution is recorded, then the process kills itself (SIGKILL)
//                        before answering
//   drop-after-commit    the execution is recorded, then the connection is closed without an
//                        answer
//   status=N             answer with status N (200-599) instead of 201; 204 and 304 have no body
//   binary=N             the body is N random bytes (application/octet-stream) instead of JSON
//   gzip                 the body is gzip-encoded, with Content-Encoding: gzip
//   set-cookie           a Set-Cookie header with a value of this request's own
//   stream=N             the body is sent in N chunks (Transfer-Encoding: chunked, headers at
//                        once), each waiting for one /_release; JSON bodies become N lines of
//                        {"id", "chunk", "of"}; binary bodies are split in N parts; with gzip,
//                        one gzip stream flushed at each chunk
//
// Keep-alive is Node's default (keepAliveTimeout 5 s), as in a real Node API.

import { appendFileSync } from "node:fs";
import { createHash, randomBytes } from "node:crypto";
import http from "node:http";
import { parseArgs } from "node:util";
import zlib from "node:zlib";

const { values: args } = parseArgs({
  options: {
    port: { type: "string", default: "0" },
    host: { type: "string", default: "127.0.0.1" },
    ledger: { type: "string" },
  },
});
if (!args.ledger) {
  process.stderr.write("usage: node server.mjs --port PORT --ledger PATH [--host HOST]\n");
  process.exit(2);
}
const ledgerPath = args.ledger;

const executions = new Map(); // Idempotency-Key -> executions since start
let unkeyed = 0;
let connections = 0;
let apiConnections = 0;
const carriedExecution = Symbol("carriedExecution");
let requests = 0;

// --- /_release: credits per channel ("" serves anyone), and the answers waiting for one ---

const credits = new Map();
const waiters = []; // {channel, resolve}, oldest first

function release(channel, n) {
  for (let i = 0; i < n; i++) {
    const index = waiters.findIndex((w) => channel === "" || w.channel === channel);
    if (index >= 0) {
      waiters.splice(index, 1)[0].resolve();
    } else {
      credits.set(channel, (credits.get(channel) ?? 0) + 1);
    }
  }
}

function acquire(channel, res) {
  for (const c of channel === "" ? [""] : [channel, ""]) {
    const n = credits.get(c) ?? 0;
    if (n > 0) {
      credits.set(c, n - 1);
      return Promise.resolve();
    }
  }
  return new Promise((resolve) => {
    // The peer went away: stop waiting, so this wait does not swallow a later release.
    const gone = () => {
      const index = waiters.indexOf(waiter);
      if (index >= 0) waiters.splice(index, 1);
      resolve();
    };
    const waiter = {
      channel,
      resolve: () => {
        res.off("close", gone);
        resolve();
      },
    };
    waiters.push(waiter);
    res.once("close", gone);
  });
}

// --- Faults ---------------------------------------------------------------------------------

class BadFault extends Error {}

function wholeNumber(name, text, min, max) {
  if (!/^[0-9]+$/.test(text ?? "")) throw new BadFault(`${name} needs a whole number, got ${JSON.stringify(text)}`);
  const n = Number(text);
  if (n < min || n > max) throw new BadFault(`${name}=${n} is out of range (${min}..${max})`);
  return n;
}

function parseFaults(header) {
  const faults = {};
  if (!header) return faults;
  for (const item of header.split(",")) {
    const [name, value] = item.trim().split("=", 2).map((s) => s.trim());
    if (name === "") continue;
    switch (name) {
      case "delay": faults.delay = wholeNumber(name, value, 0, 600000); break;
      case "status": faults.status = wholeNumber(name, value, 200, 599); break;
      case "stream": faults.stream = wholeNumber(name, value, 1, 10000); break;
      case "binary": faults.binary = wholeNumber(name, value, 0, 64 * 1024 * 1024); break;
      case "await-release": faults.awaitRelease = true; break;
      case "crash-after-commit": faults.crash = true; break;
      case "drop-after-commit": faults.drop = true; break;
      case "reset-before-read": faults.reset = true; break;
      case "gzip": faults.gzip = true; break;
      case "set-cookie": faults.setCookie = true; break;
      default: throw new BadFault(`unknown fault ${JSON.stringify(name)}`);
    }
  }
  return faults;
}

// --- Helpers --------------------------------------------------------------------------------

function pairs(rawHeaders) {
  const out = [];
  for (let i = 0; i < rawHeaders.length; i += 2) out.push([rawHeaders[i], rawHeaders[i + 1]]);
  return out;
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks);
}

function sendJson(res, status, value) {
  const body = Buffer.from(JSON.stringify(value));
  res.writeHead(status, { "Content-Type": "application/json", "Content-Length": body.length });
  res.end(body);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function split(buffer, n) {
  const parts = [];
  const size = Math.ceil(buffer.length / n);
  for (let i = 0; i < n; i++) parts.push(buffer.subarray(i * size, (i + 1) * size));
  return parts;
}

// Gzip each part as it goes: one gzip stream, flushed (Z_SYNC_FLUSH) after every part but the
// last, so each chunk can be decoded as soon as it arrives and the whole is one gzip member.
function gzipper() {
  const gz = zlib.createGzip();
  const out = [];
  gz.on("data", (data) => out.push(data));
  return async (part, last) => {
    if (last) {
      const ended = new Promise((resolve) => gz.once("end", resolve));
      gz.end(part);
      await ended;
    } else {
      gz.write(part);
      await new Promise((resolve) => gz.flush(zlib.constants.Z_SYNC_FLUSH, resolve));
    }
    return Buffer.concat(out.splice(0));
  };
}

// --- Requests -------------------------------------------------------------------------------

async function control(req, res, url) {
  switch (url.pathname) {
    case "/_stats":
      req.resume();
      sendJson(res, 200, {
        pid: process.pid,
        connections,
        api_connections: apiConnections,
        requests,
        executions: Object.fromEntries(executions),
        unkeyed,
        total: unkeyed + [...executions.values()].reduce((a, b) => a + b, 0),
        waiting: waiters.length,
        keep_alive_timeout_ms: server.keepAliveTimeout,
      });
      return;
    case "/_echo-headers":
      await readBody(req);
      sendJson(res, 200, {
        method: req.method,
        url: req.url,
        http_version: req.httpVersion,
        headers: pairs(req.rawHeaders),
      });
      return;
    case "/_release": {
      req.resume();
      let n;
      try {
        n = wholeNumber("n", url.searchParams.get("n") ?? "1", 1, 100000);
      } catch (error) {
        sendJson(res, 400, { error: error.message });
        return;
      }
      const key = url.searchParams.get("key") ?? "";
      release(key, n);
      sendJson(res, 200, { released: n, key, waiting: waiters.length });
      return;
    }
    default:
      req.resume();
      sendJson(res, 404, { error: `no control path ${url.pathname}` });
  }
}

async function execute(req, res) {
  if (!req.socket[carriedExecution]) {
    req.socket[carriedExecution] = true;
    apiConnections += 1;
  }
  let faults;
  try {
    faults = parseFaults(req.headers["x-fault"]);
  } catch (error) {
    req.resume();
    sendJson(res, 400, { error: error.message });
    return;
  }
  if (faults.reset) {
    req.socket.resetAndDestroy();
    return;
  }
  const body = await readBody(req);
  const key = req.headers["idempotency-key"] ?? null;
  const attempt = req.headers["idempo-attempt"] ?? null;
  const id = randomBytes(12).toString("hex");
  const bodySha256 = createHash("sha256").update(body).digest("hex");
  const entry = {
    time: new Date().toISOString(),
    pid: process.pid,
    id,
    method: req.method,
    path: req.url,
    key,
    attempt,
    faults: req.headers["x-fault"] ?? null,
    body_bytes: body.length,
    body_sha256: bodySha256,
    content_length: req.headers["content-length"] ?? null,
    transfer_encoding: req.headers["transfer-encoding"] ?? null,
    headers: pairs(req.rawHeaders),
  };
  // The commit: on disk (in the kernel's page cache) before anything is answered.
  appendFileSync(ledgerPath, JSON.stringify(entry) + "\n");
  if (key === null) unkeyed += 1;
  else executions.set(key, (executions.get(key) ?? 0) + 1);

  const channel = key ?? "";
  if (faults.delay) await sleep(faults.delay);
  if (faults.awaitRelease) await acquire(channel, res);
  if (faults.crash) {
    process.kill(process.pid, "SIGKILL");
    return;
  }
  if (faults.drop) {
    req.socket.destroy();
    return;
  }
  if (res.destroyed) return;

  const status = faults.status ?? 201;
  const headers = [["X-Execution-Id", id]];
  if (faults.setCookie) {
    headers.push(["Set-Cookie", `session=${randomBytes(16).toString("hex")}; Path=/; HttpOnly`]);
  }
  if (status === 204 || status === 304) {
    res.writeHead(status, headers);
    res.end();
    return;
  }

  const binary = faults.binary !== undefined;
  headers.push(["Content-Type", binary ? "application/octet-stream" : "application/json"]);
  if (faults.gzip) headers.push(["Content-Encoding", "gzip"]);

  if (faults.stream === undefined) {
    const fields = { id, key, attempt, method: req.method, path: req.url, body_bytes: body.length, body_sha256: bodySha256 };
    let payload = binary ? randomBytes(faults.binary) : Buffer.from(JSON.stringify(fields));
    if (faults.gzip) payload = zlib.gzipSync(payload);
    headers.push(["Content-Length", String(payload.length)]);
    res.writeHead(status, headers);
    res.end(payload);
    return;
  }

  const n = faults.stream;
  const parts = binary
    ? split(randomBytes(faults.binary), n)
    : Array.from({ length: n }, (_, i) => Buffer.from(JSON.stringify({ id, chunk: i + 1, of: n }) + "\n"));
  const encode = faults.gzip ? gzipper() : async (part) => part;
  res.writeHead(status, headers);
  res.flushHeaders();
  for (let i = 0; i < n; i++) {
    await acquire(channel, res);
    if (res.destroyed) return;
    const data = await encode(parts[i], i === n - 1);
    if (data.length > 0) res.write(data);
  }
  res.end();
}

const server = http.createServer((req, res) => {
  requests += 1;
  res.on("error", () => {}); // a peer that left is not this server's failure
  const url = new URL(req.url, "http://upstream");
  const work = url.pathname.startsWith("/_") ? control(req, res, url) : execute(req, res);
  work.catch((error) => {
    process.stderr.write(`${error.stack ?? error}\n`);
    if (!res.headersSent) sendJson(res, 500, { error: String(error) });
    else res.destroy();
  });
});
server.on("connection", () => {
  connections += 1;
});

server.listen(Number(args.port), args.host, () => {
  const address = server.address();
  process.stdout.write(
    JSON.stringify({
      port: address.port,
      host: address.address,
      pid: process.pid,
      keep_alive_timeout_ms: server.keepAliveTimeout,
    }) + "\n",
  );
});
