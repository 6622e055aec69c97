#!/usr/bin/env node
// A minimal MQTT 3.1.1 client over an independent QUIC stack (@matrixai/quic, Cloudflare
// quiche inside), for tests/integration/test_interop_quic.py. No shoal or aioquic code.
//
// argv[2] is JSON: {"host", "port", "clientId", "topic", "count", "timeout" (ms)}.
// EMQX conventions: ALPN "mqtt", certificate not verified, MQTT on the first bidi stream.
// It connects, subscribes to `topic` at QoS 1, publishes `count` QoS 1 messages to it and
// waits for their PUBACKs and for their deliveries back, then prints {"event": "phase", n: 1}
// and waits for a line on stdin (the test rebinds its UDP relay meanwhile: the broker sees
// our address change), then does the same again (phase 2), then DISCONNECT.
// Events, one JSON object per line: connack, suback, phase, done (exit 0) or failed (exit 1).
import { webcrypto } from 'node:crypto'
import readline from 'node:readline'
import { QUICClient } from '@matrixai/quic'
import Logger, { LogLevel } from '@matrixai/logger'

const opts = JSON.parse(process.argv[2])
const emit = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
let client
let finished = false // after our DISCONNECT the broker closes the connection: not a failure
const fail = (message) => {
  if (finished) return
  emit({ event: 'failed', message: String(message) })
  process.exit(1)
}
const timer = setTimeout(() => fail(`timed out after ${opts.timeout || 20000} ms`), opts.timeout || 20000)

// -- MQTT 3.1.1 packets ---------------------------------------------------------------------
const str = (s) => { const b = Buffer.from(s); return Buffer.concat([Buffer.from([b.length >> 8, b.length & 255]), b]) }
const u16 = (n) => Buffer.from([n >> 8, n & 255])
function varint (n) {
  const out = []
  do { let b = n % 128; n = Math.floor(n / 128); if (n > 0) b |= 128; out.push(b) } while (n > 0)
  return Buffer.from(out)
}
const packet = (byte0, body) => Buffer.concat([Buffer.from([byte0]), varint(body.length), body])
const connect = (id) => packet(0x10, Buffer.concat([str('MQTT'), Buffer.from([4, 2]), u16(30), str(id)]))
const subscribe = (pid, topic) => packet(0x82, Buffer.concat([u16(pid), str(topic), Buffer.from([1])]))
const publish = (pid, topic, payload) => packet(0x32, Buffer.concat([str(topic), u16(pid), Buffer.from(payload)]))
const puback = (pid) => packet(0x40, u16(pid))

// -- frames in ---------------------------------------------------------------------------------
let buf = Buffer.alloc(0)
const waiters = [] // {type, pid, resolve}
const received = []
let connacks = 0
let writer

function onPacket (byte0, body) {
  const type = byte0 >> 4
  if (type === 2) {
    connacks++
    if (body[1] !== 0) fail(`CONNACK refused ${body[1]}`)
  }
  if (type === 3) {
    const qos = (byte0 >> 1) & 3
    const tlen = body.readUInt16BE(0)
    const topic = body.subarray(2, 2 + tlen).toString()
    let at = 2 + tlen
    if (qos > 0) {
      const pid = body.readUInt16BE(at); at += 2
      writer.write(puback(pid))
    }
    received.push({ topic, payload: body.subarray(at).toString() })
  }
  const pid = (type === 4 || type === 9) ? body.readUInt16BE(0) : 0
  for (let i = 0; i < waiters.length; i++) {
    const w = waiters[i]
    if (w.type === type && (w.pid === 0 || w.pid === pid)) { waiters.splice(i, 1); w.resolve(body); break }
  }
  checkReceived()
}

function feed (chunk) {
  buf = Buffer.concat([buf, Buffer.from(chunk)])
  for (;;) {
    if (buf.length < 2) return
    let len = 0; let mult = 1; let i = 1
    for (;;) {
      if (i >= buf.length) return
      const b = buf[i++]; len += (b & 127) * mult; mult *= 128
      if (b < 128) break
    }
    if (buf.length < i + len) return
    onPacket(buf[0], buf.subarray(i, i + len))
    buf = buf.subarray(i + len)
  }
}

const expect = (type, pid = 0) => new Promise((resolve) => waiters.push({ type, pid, resolve }))
let receivedWaiter = null
function checkReceived () {
  if (receivedWaiter && received.length >= receivedWaiter.n) { const r = receivedWaiter; receivedWaiter = null; r.resolve() }
}
const receivedAtLeast = (n) => new Promise((resolve) => { receivedWaiter = { n, resolve }; checkReceived() })

let nextPid = 1
async function round (phase) {
  const acks = []
  for (let i = 0; i < opts.count; i++) {
    const pid = nextPid++
    acks.push(expect(4, pid))
    await writer.write(publish(pid, opts.topic, `p${phase}-${i}`))
  }
  await Promise.all(acks)
  await receivedAtLeast(phase * opts.count)
  const want = Array.from({ length: opts.count }, (_, i) => `p${phase}-${i}`)
  const got = received.slice((phase - 1) * opts.count, phase * opts.count).map((m) => m.payload)
  if (JSON.stringify(got) !== JSON.stringify(want)) fail(`phase ${phase}: got ${JSON.stringify(got)}`)
  emit({ event: 'phase', n: phase, received: received.length })
}

async function main () {
  const logger = new Logger('quic', LogLevel.WARN)
  client = await QUICClient.createQUICClient({
    host: opts.host,
    port: opts.port,
    localHost: '127.0.0.1',
    crypto: { ops: { randomBytes: async (data) => { webcrypto.getRandomValues(new Uint8Array(data)) } } },
    config: { applicationProtos: ['mqtt'], verifyPeer: false, maxIdleTimeout: 30000 },
    logger
  })
  const stream = client.connection.newStream('bidi')
  writer = stream.writable.getWriter()
  const readerDone = (async () => {
    const reader = stream.readable.getReader()
    for (;;) {
      const { value, done } = await reader.read()
      if (done) break
      feed(value)
    }
  })().catch((e) => fail(`read: ${e}`))

  await writer.write(connect(opts.clientId))
  await expect(2)
  emit({ event: 'connack', connacks })
  const subPid = nextPid++
  const suback = expect(9, subPid)
  await writer.write(subscribe(subPid, opts.topic))
  const granted = await suback
  emit({ event: 'suback', granted: granted[2] })
  await round(1)

  const rl = readline.createInterface({ input: process.stdin })
  await new Promise((resolve) => rl.once('line', resolve))
  rl.close()
  await round(2)

  await writer.write(packet(0xe0, Buffer.alloc(0))) // DISCONNECT
  // The broker ends the control stream, and with it the connection (application code 0),
  // after DISCONNECT: wait for that before tearing down, as a polite client does (a forced
  // destroy would reset the stream under the broker).
  finished = true
  await writer.close().catch(() => {})
  await readerDone
  emit({ event: 'done', connacks, received: received.length })
  clearTimeout(timer)
  await client.destroy({ force: true }).catch(() => {})
  process.exit(0)
}

main().catch((e) => fail(e && e.stack ? e.stack : e))
