#!/usr/bin/env node
// A Corral agent in plain Node.js (no npm dependencies).
//
// It speaks the Corral wire protocol as JSON lines (docs/wire-protocol.md):
// the runtime writes one JSON object per line to our stdin, we write one per line to
// stdout, and anything on stderr is captured by the runtime as log lines.
//
// Handlers:
//   echo   returns the payload plus {"from": "node"}; payload.sleep (seconds) delays
//          the answer, which makes Cancel and Shutdown easy to try
//   upper  returns {"text": payload.text.toUpperCase()}
//   fail   always fails with an ErrorInfo of type "ValueError"
"use strict";

const readline = require("node:readline");

const PROTOCOL_VERSION = 1;
const SDK = "node-echo/0.1";
const NAME = process.env.CORRAL_AGENT || "node-echo";

let heartbeatTimer = null;
let heartbeatSeq = 0;
let shuttingDown = false;
let finished = false;
let tasksDone = 0;
let tasksFailed = 0;
// Deliver id -> {timer, finish(result)} for tasks still running.
const inflight = new Map();

function log(message) {
  process.stderr.write(`${NAME}[${process.pid}]: ${message}\n`);
}

function send(msg) {
  // JSON.stringify never emits a raw newline, so one message is exactly one line.
  process.stdout.write(JSON.stringify(msg) + "\n");
}

function errorInfo(type, message, hint = "") {
  return { type, message, traceback: "", hint };
}

// ------------------------------------------------------------------ handlers
// Each handler gets (payload, task) and returns a promise of {ok, payload} or
// {ok: false, error}. task.onCancel(fn) registers a callback for Cancel.

function sleep(seconds, task) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, seconds * 1000);
    task.onCancel(() => clearTimeout(timer));
  });
}

const handlers = {
  async echo(payload, task) {
    if (payload && typeof payload === "object" && typeof payload.sleep === "number") {
      await sleep(payload.sleep, task);
    }
    const body =
      payload && typeof payload === "object" && !Array.isArray(payload)
        ? { ...payload, from: "node" }
        : { payload, from: "node" };
    return { ok: true, payload: body };
  },

  async upper(payload) {
    const text = payload && payload.text;
    if (typeof text !== "string") {
      return { ok: false, error: errorInfo("TypeError", "upper needs payload.text to be a string") };
    }
    return { ok: true, payload: { text: text.toUpperCase() } };
  },

  async fail(payload) {
    const message = (payload && payload.message) || "asked to fail";
    return { ok: false, error: errorInfo("ValueError", message, "this handler always fails") };
  },
};

// ------------------------------------------------------------------ tasks

function deliver(msg) {
  const handler = handlers[msg.handler];
  if (!handler) {
    tasksFailed += 1;
    send({
      type: "result", id: msg.id, ok: false, payload: null,
      error: errorInfo("HandlerNotFound", `no handler ${JSON.stringify(msg.handler)}`),
    });
    return;
  }
  const cancelCallbacks = [];
  let done = false;
  const task = {
    onCancel(fn) { cancelCallbacks.push(fn); },
  };
  // Exactly one Result per Deliver: whichever of "handler finished" and "cancelled"
  // comes first answers, and the other is ignored.
  const finish = (result) => {
    if (done) return;
    done = true;
    inflight.delete(msg.id);
    if (result.ok) tasksDone += 1; else tasksFailed += 1;
    send({ type: "result", id: msg.id, ok: result.ok, payload: result.payload ?? null,
           error: result.error ?? null });
    if (shuttingDown && inflight.size === 0) exitCleanly();
  };
  inflight.set(msg.id, {
    cancel(reason) {
      for (const fn of cancelCallbacks) fn();
      finish({ ok: false, error: errorInfo("TaskTimeout", `cancelled by the runtime (${reason})`) });
    },
  });
  Promise.resolve()
    .then(() => handler(msg.payload, task))
    .then(finish, (err) => finish({
      ok: false,
      error: { type: (err && err.name) || "Error", message: String((err && err.message) || err),
               traceback: (err && err.stack) || "", hint: "" },
    }));
}

function cancel(msg) {
  const task = inflight.get(msg.id);
  const reason = msg.reason || "timeout"; // fields left out take their documented default
  if (task) {
    log(`cancelling task ${msg.id} (${reason})`);
    task.cancel(reason);
  } // else it already finished: its Result is on the way, nothing to do
}

// ------------------------------------------------------------------ lifecycle

function init(msg) {
  log(`init as ${msg.agent} instance ${msg.instance}, heartbeat every ${msg.heartbeat_interval}s`);
  const every = Math.max(10, (msg.heartbeat_interval || 1) * 1000);
  heartbeatTimer = setInterval(() => send({ type: "heartbeat", seq: ++heartbeatSeq }), every);
  send({ type: "heartbeat", seq: ++heartbeatSeq });
  send({ type: "ready", handlers: Object.keys(handlers), schedules: [] });
  send({ type: "log", level: "info", message: `${SDK} ready` });
}

function shutdown(msg) {
  shuttingDown = true;
  const grace = typeof msg.grace === "number" ? msg.grace : 5;
  log(`shutdown: ${inflight.size} task(s) in flight, grace ${grace}s`);
  send({ type: "stats", tasks: tasksDone, errors: tasksFailed });
  if (inflight.size === 0) {
    exitCleanly();
    return;
  }
  // Stop what is still running a little before the grace ends; the runtime kills us after it.
  setTimeout(() => {
    for (const task of [...inflight.values()]) task.cancel("shutdown");
  }, Math.max(0, grace * 1000 - 200)).unref();
}

function exitCleanly() {
  if (finished) return;
  finished = true;
  clearInterval(heartbeatTimer);
  log("bye");
  // Let stdout drain before exiting with status 0.
  process.stdout.write("", () => process.exit(0));
}

function onMessage(msg) {
  switch (msg.type) {
    case "init": return init(msg);
    case "deliver": return deliver(msg);
    case "cancel": return cancel(msg);
    case "shutdown": return shutdown(msg);
    case "reply": return; // this agent sends no Requests
    default:
      log(`ignoring unknown message type ${JSON.stringify(msg.type)}`);
  }
}

// ------------------------------------------------------------------ main

process.stdout.on("error", (err) => {
  log(`stdout failed (${err.code}); the runtime has gone away`);
  process.exit(1);
});

const lines = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
lines.on("line", (line) => {
  if (!line.trim()) return;
  let msg;
  try {
    msg = JSON.parse(line);
  } catch (err) {
    log(`protocol error: not JSON: ${err.message}`);
    process.exit(2);
  }
  onMessage(msg);
});
lines.on("close", () => {
  if (!shuttingDown) {
    log("stdin closed without a Shutdown; exiting");
    process.exit(1);
  }
});

log(`starting (CORRAL_AGENT=${process.env.CORRAL_AGENT || ""}, ` +
    `CORRAL_INSTANCE=${process.env.CORRAL_INSTANCE || ""}, ` +
    `CORRAL_PROTOCOL=${process.env.CORRAL_PROTOCOL || ""})`);
send({ type: "hello", protocol_version: PROTOCOL_VERSION, pid: process.pid, sdk: SDK });
