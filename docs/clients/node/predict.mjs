#!/usr/bin/env node
// A complete sgserve client in ~200 lines of Node.js, written from docs/protocol.md alone.
//
//   npm install                      # in this folder: zeromq@6 and @msgpack/msgpack
//   node predict.mjs --model demo --json '{"user_id": [1, 2], "item_id": [3, 4]}'
//
// It asks the server for the model's metadata (to learn each input's dtype), sends one predict
// request, and prints the outputs as JSON. Options:
//   --endpoint URL   default $SGSERVE_ENDPOINT or tcp://127.0.0.1:8510
//   --model NAME     default "demo"
//   --version N      default: the highest version the server has
//   --signature S    default "serving_default"
//   --json TEXT      inputs as {"name": nested arrays}; strings for string inputs
//   --routing-key K  forwarded as a string (the "mod" policy hashes it with crc32)
//   --timeout MS     default 5000; sent as timeout_ms and used as the receive timeout
// Exit code: 0 on success, 1 on a non-200 reply (code and message on stderr) or no reply.

import { Dealer } from "zeromq";
import { encode, decode } from "@msgpack/msgpack";

const MAGIC = Buffer.from("SGS1");

// dtype -> [bytes per element, DataView getter, DataView setter]; every number is little-endian.
const DTYPES = {
  float16: [2, getFloat16, setFloat16],
  float32: [4, "getFloat32", "setFloat32"],
  float64: [8, "getFloat64", "setFloat64"],
  int8: [1, "getInt8", "setInt8"],
  int16: [2, "getInt16", "setInt16"],
  int32: [4, "getInt32", "setInt32"],
  int64: [8, "getBigInt64", "setBigInt64"],
  uint8: [1, "getUint8", "setUint8"],
  uint16: [2, "getUint16", "setUint16"],
  uint32: [4, "getUint32", "setUint32"],
  uint64: [8, "getBigUint64", "setBigUint64"],
  bool: [1, "getUint8", "setUint8"],
};

function parseArgs(argv) {
  const opts = {
    endpoint: process.env.SGSERVE_ENDPOINT || "tcp://127.0.0.1:8510",
    model: "demo", version: undefined, signature: "serving_default", json: "{}",
    routingKey: undefined, timeout: 5000,
  };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === "--endpoint") opts.endpoint = value;
    else if (flag === "--model") opts.model = value;
    else if (flag === "--version") opts.version = Number.parseInt(value, 10);
    else if (flag === "--signature") opts.signature = value;
    else if (flag === "--json") opts.json = value;
    else if (flag === "--routing-key") opts.routingKey = value;
    else if (flag === "--timeout") opts.timeout = Number(value);
    else throw new Error(`unknown option ${flag}`);
  }
  return opts;
}

// --- tensors ------------------------------------------------------------------------------------

function shapeOf(value) {
  const shape = [];
  for (let v = value; Array.isArray(v); v = v[0]) shape.push(v.length);
  return shape;
}

// One tensor entry + payload frame. Numbers go C order (row-major), little-endian; strings go as
// one msgpack array of bin values.
function encodeTensor(name, dtype, value) {
  const shape = shapeOf(value);
  const flat = Array.isArray(value) ? value.flat(Infinity) : [value];
  const count = shape.reduce((a, b) => a * b, 1);
  if (flat.length !== count) throw new Error(`input '${name}' is ragged: shape ${JSON.stringify(shape)}`);
  const meta = { name, dtype, shape };
  if (dtype === "string") {
    const te = new TextEncoder();
    return [meta, Buffer.from(encode(flat.map((s) => te.encode(String(s)))))];
  }
  const spec = DTYPES[dtype];
  if (!spec) throw new Error(`input '${name}': dtype ${dtype} is not supported on the wire`);
  const [size, , setter] = spec;
  const buf = Buffer.alloc(count * size);
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  flat.forEach((x, i) => {
    if (dtype === "bool") x = x ? 1 : 0;
    else if (dtype === "int64" || dtype === "uint64") x = BigInt(x);
    if (typeof setter === "function") setter(view, i * size, x);
    else view[setter](i * size, x, true);
  });
  return [meta, buf];
}

function decodeTensor(meta, frame) {
  const count = meta.shape.reduce((a, b) => a * b, 1);
  let flat;
  if (meta.dtype === "string") {
    const td = new TextDecoder();
    flat = frame.length ? decode(frame).map((b) => td.decode(b)) : [];
  } else {
    const [size, getter] = DTYPES[meta.dtype];
    if (frame.length !== count * size) throw new Error(`output '${meta.name}': bad payload size`);
    const view = new DataView(frame.buffer, frame.byteOffset, frame.byteLength);
    flat = [];
    for (let i = 0; i < count; i++) {
      let x = typeof getter === "function" ? getter(view, i * size) : view[getter](i * size, true);
      if (typeof x === "bigint") x = Number.isSafeInteger(Number(x)) ? Number(x) : x.toString();
      if (meta.dtype === "bool") x = x !== 0;
      flat.push(x);
    }
  }
  return reshape(flat, meta.shape);
}

function reshape(flat, shape) {
  if (shape.length === 0) return flat[0];
  const [n, ...rest] = shape;
  const step = rest.reduce((a, b) => a * b, 1);
  return Array.from({ length: n }, (_, i) => reshape(flat.slice(i * step, (i + 1) * step), rest));
}

// IEEE 754 binary16 <-> JS number (DataView has no float16 accessors before Node 24).
function getFloat16(view, offset) {
  const h = view.getUint16(offset, true);
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
  if (exp === 0) return sign * 2 ** -14 * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * 2 ** (exp - 15) * (1 + frac / 1024);
}

function setFloat16(view, offset, x) {
  const f32 = new Float32Array([x]);
  const b = new Uint32Array(f32.buffer)[0];
  const sign = (b >>> 16) & 0x8000, exp = ((b >>> 23) & 0xff) - 127 + 15, frac = b & 0x7fffff;
  // Round to nearest, ties to even (as numpy does); a carry out of the mantissa bumps the exponent.
  const round = (m, shift) => {
    const rem = m & ((1 << shift) - 1), half = 1 << (shift - 1), q = m >>> shift;
    return rem > half || (rem === half && q & 1) ? q + 1 : q;
  };
  let h;
  if (Number.isNaN(x)) h = 0x7e00;
  else if (exp >= 31) h = sign | 0x7c00;
  else if (exp <= 0) h = exp < -10 ? sign : sign | round(frac | 0x800000, 14 - exp);
  else h = sign | Math.min((exp << 10) + round(frac, 13), 0x7c00);
  view.setUint16(offset, h, true);
}

// --- requests -----------------------------------------------------------------------------------

let nextId = 1;

// Sends [MAGIC, header, ...payload] and returns [replyHeader, payloadFrames]. A DEALER socket adds
// no delimiter frame and gets none back. Replies are matched by id: a late reply is skipped.
async function call(sock, header, payload = [], timeoutMs = 5000) {
  const id = nextId++;
  const frames = [MAGIC, Buffer.from(encode({ ...header, id, timeout_ms: timeoutMs })), ...payload];
  await sock.send(frames);
  for (;;) {
    const reply = await sock.receive(); // throws EAGAIN after sock.receiveTimeout ms
    if (reply.length < 2 || !reply[0].equals(MAGIC)) throw new Error("malformed reply");
    const h = decode(reply[1]);
    if (h.id !== id) continue;
    if (h.code !== 200) {
      const err = new Error(`${h.code}: ${h.message}`);
      err.code = h.code;
      throw err;
    }
    return [h, reply.slice(2)];
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  const sock = new Dealer({ linger: 0, receiveTimeout: opts.timeout + 500 });
  sock.connect(opts.endpoint);
  try {
    const which = { model: opts.model, ...(opts.version !== undefined && { version: opts.version }) };
    const [meta] = await call(sock, { type: "metadata", ...which }, [], opts.timeout);
    const sig = meta.signatures[opts.signature];
    if (!sig) throw new Error(`model has no signature '${opts.signature}'`);

    const metas = [], payload = [];
    for (const [name, value] of Object.entries(JSON.parse(opts.json))) {
      const dtype = sig.inputs[name] ? sig.inputs[name].dtype : "float32"; // the server names the error
      const [m, frame] = encodeTensor(name, dtype, value);
      metas.push(m);
      payload.push(frame);
    }
    const header = { type: "predict", ...which, version: meta.version, signature: opts.signature, inputs: metas };
    if (opts.routingKey !== undefined) header.routing_key = opts.routingKey;
    const [reply, frames] = await call(sock, header, payload, opts.timeout);
    const outputs = {};
    (reply.outputs || []).forEach((m, i) => { outputs[m.name] = decodeTensor(m, frames[i]); });
    console.log(JSON.stringify({ model: reply.model, version: reply.version, worker: reply.worker, outputs }));
  } finally {
    sock.close();
  }
}

main().catch((err) => {
  const why = err.code === "EAGAIN" ? `no reply within the timeout (is sgserve running?)` : err.message;
  console.error(`sgserve: ${why}`);
  process.exit(1);
});
