#!/usr/bin/env node
// Runs an MQTT.js scenario given as JSON (argv[2]) and prints one JSON object per
// line on stdout for every event, for tests/integration/test_interop_mqttjs.py.
//
// Scenario: {"url": "mqtt://127.0.0.1:PORT", "timeout": ms, "steps": [...]}
// Steps run in order; each names the client it acts on ("client": "a"):
//   {"op": "connect", "client", "options"}
//                                                   -> {"event": "connect", sessionPresent, properties}
//   {"op": "subscribe", "client", "topic", "qos", "options"} -> {"event": "suback", granted}
//   {"op": "unsubscribe", "client", "topic"}        -> {"event": "unsuback"}
//   {"op": "publish", "client", "topic", "payload", "qos", "retain", "properties", "hex",
//    "repeat"} (payload repeated `repeat` times, for big messages)
//                                                   -> {"event": "published"} once acknowledged
//   {"op": "expect", "client", "count"}             waits until the client has received `count`
//                                                   messages in total
//   {"op": "end", "client"}                         clean DISCONNECT
//   {"op": "destroy", "client"}                     drops the TCP connection, no DISCONNECT
// Events from clients: {"event": "message", client, topic, payload (null above 4 KiB),
// size, sha256, qos, retain, dup, properties}, {"event": "sent", client, topic, alias} for
// each PUBLISH written,
// {"event": "error", client, message}, {"event": "close", client}. The last line is
// {"event": "done"} (exit 0) or {"event": "failed", "message"} (exit 1).
'use strict'

const crypto = require('crypto')
const mqtt = require('mqtt')

const scenario = JSON.parse(process.argv[2])
const clients = {}
const received = {}
const waiters = []

function emit (obj) {
  process.stdout.write(JSON.stringify(obj) + '\n')
}

function fail (message) {
  emit({ event: 'failed', message: String(message) })
  for (const c of Object.values(clients)) c.end(true)
  process.exit(1)
}

const timer = setTimeout(() => fail(`scenario timed out after ${scenario.timeout || 15000} ms`),
  scenario.timeout || 15000)

function jsonProps (props) {
  if (!props) return undefined
  const out = {}
  for (const [k, v] of Object.entries(props)) {
    out[k] = Buffer.isBuffer(v) ? { hex: v.toString('hex') } : v
  }
  return out
}

function inProps (props) {
  if (!props) return undefined
  const out = { ...props }
  if (out.correlationData !== undefined) out.correlationData = Buffer.from(out.correlationData, 'hex')
  return out
}

function checkWaiters () {
  for (let i = waiters.length - 1; i >= 0; i--) {
    const w = waiters[i]
    if ((received[w.client] || 0) >= w.count) {
      waiters.splice(i, 1)
      w.resolve()
    }
  }
}

function connect (name, options) {
  return new Promise((resolve, reject) => {
    const opts = { reconnectPeriod: 0, connectTimeout: 5000, ...options }
    if (opts.will && opts.will.properties) opts.will.properties = inProps(opts.will.properties)
    const c = mqtt.connect(scenario.url, opts)
    clients[name] = c
    received[name] = received[name] || 0
    let settled = false
    c.on('connect', (connack) => {
      emit({ event: 'connect', client: name, sessionPresent: connack.sessionPresent,
        reasonCode: connack.reasonCode, properties: jsonProps(connack.properties) })
      if (!settled) { settled = true; resolve() }
    })
    c.on('message', (topic, payload, packet) => {
      received[name] += 1
      const big = payload.length > 4096
      emit({ event: 'message', client: name, topic,
        payload: big ? null : payload.toString('utf8'), size: payload.length,
        sha256: crypto.createHash('sha256').update(payload).digest('hex'),
        qos: packet.qos, retain: packet.retain, dup: packet.dup,
        properties: jsonProps(packet.properties) })
      checkWaiters()
    })
    c.on('packetsend', (packet) => {
      if (packet.cmd === 'publish') {
        emit({ event: 'sent', client: name, topic: String(packet.topic),
          alias: packet.properties ? packet.properties.topicAlias : undefined })
      }
    })
    c.on('error', (err) => {
      emit({ event: 'error', client: name, message: String(err && err.message) })
      if (!settled) { settled = true; reject(err) }
    })
    c.on('close', () => emit({ event: 'close', client: name }))
  })
}

function promisify (fn) {
  return new Promise((resolve, reject) => fn((err, res) => (err ? reject(err) : resolve(res))))
}

async function run () {
  for (const step of scenario.steps) {
    const c = clients[step.client]
    switch (step.op) {
      case 'connect':
        await connect(step.client, step.options || {})
        break
      case 'subscribe': {
        const granted = await promisify((cb) =>
          c.subscribe(step.topic, { qos: step.qos || 0, ...(step.options || {}) }, cb))
        emit({ event: 'suback', client: step.client, granted })
        break
      }
      case 'unsubscribe':
        await promisify((cb) => c.unsubscribe(step.topic, cb))
        emit({ event: 'unsuback', client: step.client })
        break
      case 'publish': {
        let payload = step.hex !== undefined ? Buffer.from(step.hex, 'hex') : (step.payload || '')
        if (step.repeat) payload = Buffer.from(String(payload).repeat(step.repeat))
        const opts = { qos: step.qos || 0, retain: !!step.retain }
        if (step.properties) opts.properties = inProps(step.properties)
        await promisify((cb) => c.publish(step.topic, payload, opts, cb))
        emit({ event: 'published', client: step.client, topic: step.topic })
        break
      }
      case 'expect':
        await new Promise((resolve) => {
          waiters.push({ client: step.client, count: step.count, resolve })
          checkWaiters()
        })
        break
      case 'end':
        await new Promise((resolve) => c.end(false, {}, resolve))
        break
      case 'destroy':
        c.stream.destroy()
        await new Promise((resolve) => (c.connected ? c.once('close', resolve) : resolve()))
        break
      default:
        throw new Error(`unknown op ${step.op}`)
    }
  }
}

run().then(() => {
  clearTimeout(timer)
  emit({ event: 'done' })
  for (const c of Object.values(clients)) c.end(true)
  process.exit(0)
}, (err) => fail(err && err.stack ? err.stack : err))
