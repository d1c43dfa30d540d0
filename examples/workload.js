#!/usr/bin/env node
// Replays the metrics that the dashboard front end's backend sends, through
// the real hot-shots client, against a statsd-aggregator (or any DogStatsD
// server).
//
//   node examples/workload.js                        # live demo: UDP 127.0.0.1:8125 for 1 h
//   node examples/workload.js --count 300 --pause-ms 0 --seed 7 --port 9125
//   node examples/workload.js --protocol tcp --port 8125
//   node examples/workload.js --protocol stream --path /tmp/statsd.sock   # unix stream socket
//   node examples/workload.js --protocol uds --path /tmp/dsd.sock         # unix datagram (unix-dgram)
//
// Options (flag, or environment variable):
//   --host HOST         STATSD_HOST        default 127.0.0.1
//   --port PORT         STATSD_PORT        default 8125
//   --protocol P        STATSD_PROTOCOL    udp | tcp | stream | uds   (default udp)
//   --path PATH         STATSD_SOCKET      unix socket path for stream / uds
//   --prefix P          WORKLOAD_PREFIX    default "sigma_playground."
//   --seed N            WORKLOAD_SEED      PRNG seed (default 1): same seed, same metrics
//   --count N           WORKLOAD_COUNT     iterations (default 0 = until --duration or Ctrl-C)
//   --duration S        WORKLOAD_DURATION  seconds before stopping on its own (default 3600)
//   --pause-ms MS       WORKLOAD_PAUSE_MS  pause between iterations (default 100)
//   --max-buffer-size B WORKLOAD_MAX_BUFFER  hot-shots maxBufferSize in bytes (default 1400;
//                                           0 = one datagram / write per metric)
//
// Each iteration is one page load of the backend: workbook.views (+ embeds,
// errors, user.logins now and then), workbook.load_time, 1-3 db.query_time with
// the SQL text as the `sql` tag, 1-3 api.requests; health.* gauges every 10th
// iteration and once more at the very end (after every earlier send completed,
// so that report holds the gauges' last values).
//
// When it stops (count reached, duration over, SIGINT or SIGTERM) it closes the
// client, which flushes hot-shots' buffer, and prints ONE JSON line to stdout
// describing exactly what it sent (metrics_sent = metric lines sent):
//   {"prefix", "seed", "protocol", "iterations", "metrics_sent", "errors",
//    "counters": [{"name", "tags": {k: v}, "total"}],
//    "timers":   [{"name", "tags": {k: v}, "count", "sum", "min", "max", "values": [sorted]}],
//    "gauges":   [{"name", "tags": {k: v}, "last"}]}
// Names include the prefix. Every value is chosen so that the sums are exact in
// binary floating point (integers, quarters, eighths), whatever the order of
// addition. Exits 1 if the client reported any error.
'use strict';

const net = require('net');
const StatsD = require('hot-shots');

// ------------------------------------------------------------------ options

function parseOptions(argv, env) {
  const spec = {
    host: ['STATSD_HOST', '127.0.0.1', String],
    port: ['STATSD_PORT', '8125', Number],
    protocol: ['STATSD_PROTOCOL', 'udp', String],
    path: ['STATSD_SOCKET', '', String],
    prefix: ['WORKLOAD_PREFIX', 'sigma_playground.', String],
    seed: ['WORKLOAD_SEED', '1', Number],
    count: ['WORKLOAD_COUNT', '0', Number],
    duration: ['WORKLOAD_DURATION', '3600', Number],
    'pause-ms': ['WORKLOAD_PAUSE_MS', '100', Number],
    'max-buffer-size': ['WORKLOAD_MAX_BUFFER', '1400', Number],
  };
  const raw = {};
  for (const [key, [envName, fallback]] of Object.entries(spec)) {
    raw[key] = env[envName] !== undefined && env[envName] !== '' ? env[envName] : fallback;
  }
  for (let i = 0; i < argv.length; i++) {
    let arg = argv[i];
    if (arg === '-h' || arg === '--help') {
      process.stdout.write(require('fs').readFileSync(__filename, 'utf8')
        .split('\n').filter((l) => l.startsWith('//')).map((l) => l.slice(3)).join('\n') + '\n');
      process.exit(0);
    }
    if (!arg.startsWith('--')) {
      fail(`unexpected argument ${JSON.stringify(arg)} (see --help)`);
    }
    arg = arg.slice(2);
    let value;
    const eq = arg.indexOf('=');
    if (eq >= 0) {
      value = arg.slice(eq + 1);
      arg = arg.slice(0, eq);
    } else {
      value = argv[++i];
    }
    if (!(arg in spec)) {
      fail(`unknown option --${arg} (see --help)`);
    }
    if (value === undefined) {
      fail(`--${arg} needs a value`);
    }
    raw[arg] = value;
  }
  const options = {};
  for (const [key, [, , type]] of Object.entries(spec)) {
    const value = type(raw[key]);
    if (type === Number && !(Number.isFinite(value) && value >= 0)) {
      fail(`--${key} must be a number >= 0, not ${JSON.stringify(raw[key])}`);
    }
    options[key] = value;
  }
  if (!['udp', 'tcp', 'stream', 'uds'].includes(options.protocol)) {
    fail(`--protocol must be udp, tcp, stream or uds, not ${JSON.stringify(options.protocol)}`);
  }
  if ((options.protocol === 'stream' || options.protocol === 'uds') && !options.path) {
    fail(`--protocol ${options.protocol} needs --path (a unix socket)`);
  }
  return options;
}

function fail(message) {
  process.stderr.write(`workload.js: ${message}\n`);
  process.exit(2);
}

// ------------------------------------------------------------------ PRNG

// mulberry32: a small deterministic 32-bit PRNG, so a seed replays the same run.
function mulberry32(seed) {
  let a = seed >>> 0;
  return function next() {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

// ------------------------------------------------------------------ the workload

// Workbooks are visited with a skewed (Zipf-like) popularity so the top list is
// meaningful; users uniformly.
const WORKBOOKS = Array.from({ length: 12 }, (_, i) => `wb-${i + 1}`);
const WORKBOOK_WEIGHTS = WORKBOOKS.map((_, i) => 1 / (i + 1));
const USERS = Array.from({ length: 25 }, (_, i) => `u-${i + 1}`);
const ERROR_TYPES = ['timeout', 'permission_denied', 'query_failed', 'render_error'];
const ROUTES = [
  ['/api/workbooks', 'GET'],
  ['/api/workbooks/:id', 'GET'],
  ['/api/workbooks/:id', 'PUT'],
  ['/api/embed/:token', 'GET'],
  ['/api/users/me', 'GET'],
  ['/api/login', 'POST'],
];
const STATUSES = ['200', '200', '200', '200', '200', '200', '201', '304', '404', '500'];
// Tag values: no ',' '|' '@' '#' (hot-shots would rewrite them), ASCII only
// (hot-shots writes TCP as 'ascii'); ':' ' ' '*' '=' '?' '(' ')' are kept as-is.
const QUERIES = [
  'SELECT * FROM workbooks WHERE id = ?',
  'SELECT COUNT(*) FROM views WHERE workbook_id = ? AND ts > ?',
  'UPDATE users SET last_login = NOW() WHERE id = ?',
  'INSERT INTO embeds (workbook_id) VALUES (?)',
  'SELECT * FROM users WHERE id = :user_id',
  "SELECT * FROM workbooks WHERE owner = ? AND name LIKE 'sales%'",
];

class Recorder {
  constructor() {
    this.series = new Map();
    this.sent = 0;
  }

  entry(kind, name, tags) {
    const sorted = Object.keys(tags).sort().map((k) => [k, tags[k]]);
    const key = JSON.stringify([kind, name, sorted]);
    let entry = this.series.get(key);
    if (!entry) {
      entry = { kind, name, tags: Object.fromEntries(sorted), total: 0, values: [], last: null };
      this.series.set(key, entry);
    }
    this.sent += 1;
    return entry;
  }

  summary(extra) {
    const out = { ...extra, metrics_sent: this.sent, counters: [], timers: [], gauges: [] };
    const entries = [...this.series.values()].sort((a, b) =>
      (a.kind + a.name + JSON.stringify(a.tags)).localeCompare(b.kind + b.name + JSON.stringify(b.tags)));
    for (const e of entries) {
      if (e.kind === 'counter') {
        out.counters.push({ name: e.name, tags: e.tags, total: e.total });
      } else if (e.kind === 'timer') {
        const values = [...e.values].sort((x, y) => x - y);
        out.timers.push({
          name: e.name,
          tags: e.tags,
          count: values.length,
          sum: values.reduce((s, v) => s + v, 0),
          min: values[0],
          max: values[values.length - 1],
          values,
        });
      } else {
        out.gauges.push({ name: e.name, tags: e.tags, last: e.last });
      }
    }
    return out;
  }
}

function makeWorkload(client, prefix, rng, recorder) {
  const pick = (items) => items[Math.floor(rng() * items.length)];
  const weighted = (items, weights) => {
    const total = weights.reduce((s, w) => s + w, 0);
    let x = rng() * total;
    for (let i = 0; i < items.length; i++) {
      x -= weights[i];
      if (x < 0) {
        return items[i];
      }
    }
    return items[items.length - 1];
  };
  // Multiples of 1/4 or 1/8: sums of these are exact in binary floating point.
  const quarter = (x) => Math.round(x * 4) / 4;
  const eighth = (x) => Math.round(x * 8) / 8;

  const increment = (name, value, tags) => {
    recorder.entry('counter', prefix + name, tags).total += value;
    client.increment(name, value, 1, tags);
  };
  const timing = (name, value, tags) => {
    recorder.entry('timer', prefix + name, tags).values.push(value);
    client.timing(name, value, 1, tags);
  };
  const gauge = (name, value, tags) => {
    recorder.entry('gauge', prefix + name, tags).last = value;
    client.gauge(name, value, 1, tags);
  };

  // Process health gauges: every 10th iteration, and once more at the end.
  const health = () => {
    gauge('health.memory_mb', Math.round((180 + 60 * rng()) * 10) / 10, {});
    gauge('health.event_loop_lag_ms', Math.round(rng() * 2500) / 100, {});
    gauge('health.active_connections', Math.floor(rng() * 64), {});
  };

  const iteration = (i) => {
    const workbookId = weighted(WORKBOOKS, WORKBOOK_WEIGHTS);
    const userId = pick(USERS);

    // A workbook page load: the view, how long it took, the queries behind it.
    increment('workbook.views', 1, { workbook_id: workbookId, user_id: userId });
    timing('workbook.load_time', quarter(40 + 900 * Math.pow(rng(), 2.5)), { workbook_id: workbookId });
    const queries = 1 + Math.floor(rng() * 3);
    for (let q = 0; q < queries; q++) {
      timing('db.query_time', eighth(0.5 + 120 * Math.pow(rng(), 3)), { sql: pick(QUERIES) });
    }
    if (rng() < 0.3) {
      increment('workbook.embeds', 1, {
        workbook_id: workbookId,
        user_id: userId,
        success: rng() < 0.9 ? 'true' : 'false',
      });
    }
    if (rng() < 0.08) {
      increment('workbook.errors', 1, { workbook_id: workbookId, error_type: pick(ERROR_TYPES) });
    }
    if (rng() < 0.1) {
      increment('user.logins', 1, { user_id: pick(USERS) });
    }
    const requests = 1 + Math.floor(rng() * 3);
    for (let r = 0; r < requests; r++) {
      const [route, method] = pick(ROUTES);
      increment('api.requests', 1, { route, method, status: pick(STATUSES) });
    }
    if (i % 10 === 0) {
      health();
    }
  };
  return { iteration, health };
}

// ------------------------------------------------------------------ main

function main() {
  const options = parseOptions(process.argv.slice(2), process.env);
  const rng = mulberry32(options.seed);
  const recorder = new Recorder();
  let errors = 0;
  const errorMessages = [];
  const onError = (err) => {
    errors += 1;
    if (errorMessages.length < 5) {
      errorMessages.push(String(err && err.message ? err.message : err));
    }
  };

  const clientOptions = {
    prefix: options.prefix,
    maxBufferSize: options['max-buffer-size'],
    bufferFlushInterval: 200,
    closingFlushInterval: 200, // close() waits up to 11 x this for writes in flight
    errorHandler: onError,
  };
  if (options.protocol === 'udp' || options.protocol === 'tcp') {
    Object.assign(clientOptions, { protocol: options.protocol, host: options.host, port: options.port });
  } else if (options.protocol === 'stream') {
    // hot-shots' "stream" protocol writes newline-terminated lines to a stream
    // we open: here a unix stream socket (statsd-aggregator --unix-stream PATH).
    const socket = net.connect(options.path);
    socket.on('error', onError);
    Object.assign(clientOptions, { protocol: 'stream', stream: socket });
  } else {
    // A unix datagram socket has a short queue (net.unix.max_dgram_qlen):
    // retry a congested send a few more times than hot-shots' default 3.
    Object.assign(clientOptions, {
      protocol: 'uds',
      path: options.path,
      udsRetryOptions: { retries: 10, retryDelayMs: 10, maxRetryDelayMs: 200 },
    });
  }
  const client = new StatsD(clientOptions);
  const { iteration, health } = makeWorkload(client, client.prefix, rng, recorder);

  let stopping = false;
  const stop = () => {
    stopping = true;
  };
  process.on('SIGINT', stop);
  process.on('SIGTERM', stop);

  const started = Date.now();
  const deadline = started + options.duration * 1000;
  let done = 0;

  // The final health report goes out after every earlier send completed
  // (client.flush waits for sends in flight, retries included), so it is
  // surely the last value of each gauge that the server sees, even on
  // transports where hot-shots retries (and so reorders) a congested send.
  // setImmediate: on the uds transport the flush callback can run inside
  // flushQueue() before it empties its buffer (unix-dgram calls back
  // synchronously), and metrics sent from there would resend that buffer.
  const finish = () => {
    client.flush((flushError) => {
      if (flushError) {
        onError(flushError);
      }
      setImmediate(() => {
        health();
        client.close(report);
      });
    });
  };
  let reported = false;
  const report = (err) => {
    if (reported) {
      return;
    }
    reported = true;
    if (err) {
      onError(err);
    }
    const summary = recorder.summary({
      prefix: client.prefix,
      seed: options.seed,
      protocol: options.protocol,
      iterations: done,
      seconds: (Date.now() - started) / 1000,
      errors,
      error_messages: errorMessages,
    });
    process.stdout.write(JSON.stringify(summary) + '\n', () => process.exit(errors ? 1 : 0));
  };

  // Whatever happens to the connection, the summary is printed: if hot-shots
  // never calls back (a stream destroyed under it), report when Node is about
  // to exit with nothing left to do.
  process.on('beforeExit', () => report(new Error('the client did not finish closing')));

  const step = () => {
    if (stopping || (options.count && done >= options.count) || Date.now() >= deadline) {
      finish();
      return;
    }
    iteration(done);
    done += 1;
    // Yield to the event loop every iteration so sends go out as we go.
    if (options['pause-ms'] > 0) {
      setTimeout(step, options['pause-ms']);
    } else {
      setImmediate(step);
    }
  };
  step();
}

main();
