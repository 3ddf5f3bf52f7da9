// A js-libp2p peer that probes a KNEXA node the way a peer of another implementation
// would (tests/interop/test_js_libp2p.py runs it; docs/protocol.md "Interoperability").
//
//   node peer.mjs probe <multiaddr> <protocol> [<protocol> ...]
//   node peer.mjs plaintext <multiaddr>
//
// probe: dial with tcp + noise + yamux, run identify and ping, then for every protocol
// and every kind of garbage open a fresh stream, write the garbage, close our write side
// and wait (bounded) for the node to end the stream: a clean end (its FIN) or a reset.
// A stream the node neither closes nor resets is the bug this exists to catch
// (issue 14 §5). Last, a fresh stream on the first protocol plus a ping show that the
// node still serves. One JSON document per line on stdout; the last has type "summary".
//
// plaintext: dial offering only /plaintext/2.0.0, which a KNEXA node must refuse.
// Exit code: 0 when every check held, 1 when one failed, 2 on usage errors.

// js-libp2p 3.x calls Promise.withResolvers (Node >= 22). Node 20 lacks it, and static
// imports run before this module's body, so the polyfill comes first and libp2p is
// loaded with dynamic imports below.
if (typeof Promise.withResolvers !== 'function') {
  Promise.withResolvers = function withResolvers () {
    let resolve
    let reject
    const promise = new this((res, rej) => { resolve = res; reject = rej })
    return { promise, resolve, reject }
  }
}

const { createLibp2p } = await import('libp2p')
const { tcp } = await import('@libp2p/tcp')
const { noise } = await import('@chainsafe/libp2p-noise')
const { yamux } = await import('@chainsafe/libp2p-yamux')
const { identify } = await import('@libp2p/identify')
const { ping } = await import('@libp2p/ping')
const { plaintext } = await import('@libp2p/plaintext')
const { multiaddr } = await import('@multiformats/multiaddr')

const STREAM_WAIT_MS = Number(process.env.KNEXA_INTEROP_WAIT_MS ?? 10_000)
const DIAL_MS = 15_000

// Garbage a confused or hostile peer might send; each hits a different rejection path
// of a varint-framed msgpack protocol (protocol/framing.py).
const GARBAGE = {
  // a whole frame whose body is not msgpack: MalformedFrame after a complete read
  'not-msgpack': Uint8Array.from([0x05, 0x68, 0x65, 0x6c, 0x6c, 0x6f]),
  // a length prefix promising more than is sent before our FIN: truncated at EOF
  truncated: Uint8Array.from([0x40, 0x01, 0x02, 0x03]),
  // a length prefix far above any frame cap: FrameTooLarge before the body
  oversize: Uint8Array.from([0xff, 0xff, 0xff, 0xff, 0x0f, 0x00]),
  // a varint that never ends
  'bad-varint': new Uint8Array(16).fill(0xff),
  // a valid msgpack map that is no envelope
  'wrong-shape': Uint8Array.from([0x03, 0x81, 0xa1, 0x76]),
  // a bad frame with more junk behind it than py-libp2p's largest yamux window (16 MiB)
  // lets be in flight: a node that stops reading after its refusal, and only sends its
  // FIN, leaves this peer waiting for window credit forever (issue 14 §5)
  'bad-frame-then-20MiB': (() => {
    const bytes = new Uint8Array(20 * 1024 * 1024).fill(0x41)
    bytes.set([0x05, 0x68, 0x65, 0x6c, 0x6c, 0x6f])
    return bytes
  })()
}
const SEND_CHUNK = 64 * 1024

function emit (doc) {
  process.stdout.write(JSON.stringify(doc) + '\n')
}

function errText (err) {
  if (err == null) return null
  return `${err.name ?? 'Error'}: ${err.message ?? String(err)}`.slice(0, 300)
}

function baseNode (encrypters) {
  return createLibp2p({
    addresses: { listen: [] },
    transports: [tcp()],
    connectionEncrypters: encrypters,
    streamMuxers: [yamux()],
    services: {
      identify: identify({ runOnConnectionOpen: false }),
      ping: ping()
    }
  })
}

// Wait until the remote ends the stream we half-closed. 'close' fires once both write
// sides are closed (their FIN: "eof") or the stream was reset ("reset"); a timeout means
// the node left the stream hanging.
async function finish (stream, started) {
  let received = 0
  let remoteEof = false
  stream.addEventListener('message', (evt) => { received += evt.data.byteLength })
  stream.addEventListener('remoteCloseWrite', () => { remoteEof = true })
  const { promise, resolve } = Promise.withResolvers()
  if (stream.status === 'closed' || stream.status === 'reset' || stream.status === 'aborted') {
    resolve({ how: stream.status === 'closed' ? 'eof' : 'reset', error: null })
  }
  stream.addEventListener('close', (evt) => {
    resolve({ how: evt.error != null ? (evt.local ? 'local-abort' : 'reset') : 'eof', error: errText(evt.error) })
  })
  const timer = setTimeout(() => resolve({ how: 'timeout', error: null }), STREAM_WAIT_MS)
  const outcome = await promise
  clearTimeout(timer)
  const ms = Date.now() - started
  if (outcome.how === 'timeout') {
    stream.abort(new Error('remote never ended the stream'))
  }
  return { ...outcome, ended: outcome.how === 'eof' || outcome.how === 'reset', ms, received, remoteEof }
}

// Send in slices, waiting for 'drain' like a well-behaved writer: one huge send() would
// overflow js-libp2p's own write buffer and abort the stream on our side.
async function sendAll (stream, bytes) {
  for (let at = 0; at < bytes.byteLength; at += SEND_CHUNK) {
    if (!stream.send(bytes.subarray(at, at + SEND_CHUNK))) {
      await stream.onDrain({ signal: AbortSignal.timeout(STREAM_WAIT_MS) })
    }
  }
}

async function garbageOn (conn, protocol, kind, bytes, negotiateFully) {
  const started = Date.now()
  const tag = { protocol, garbage: kind, negotiate: negotiateFully ? 'full' : 'optimistic' }
  let stream
  try {
    stream = await conn.newStream(protocol, { signal: AbortSignal.timeout(DIAL_MS), negotiateFully })
  } catch (err) {
    return { ...tag, ended: false, how: 'open-failed', error: errText(err), ms: Date.now() - started }
  }
  const done = finish(stream, started)
  try {
    await sendAll(stream, bytes)
    await stream.close({ signal: AbortSignal.timeout(STREAM_WAIT_MS) })
  } catch (err) {
    // a reset by the node before all our bytes or our FIN went out also ends the stream;
    // a stream still open here is stuck on our side, which 'finish' reports as a timeout
    if (stream.status === 'open' && !(err?.name === 'TimeoutError' || err?.name === 'AbortError')) {
      stream.abort(err)
      return { ...tag, ended: false, how: 'write-failed', error: errText(err), ms: Date.now() - started }
    }
  }
  return { ...tag, ...(await done) }
}

// A fresh stream with nothing on it: the node must negotiate it and then answer or end it.
async function stillServes (conn, protocol) {
  const started = Date.now()
  try {
    const stream = await conn.newStream(protocol, { signal: AbortSignal.timeout(DIAL_MS) })
    const done = finish(stream, started)
    await stream.close({ signal: AbortSignal.timeout(STREAM_WAIT_MS) })
    const res = await done
    return { protocol, ok: res.ended, ...res }
  } catch (err) {
    return { protocol, ok: false, how: 'open-failed', error: errText(err), ms: Date.now() - started }
  }
}

async function probe (target, protocols) {
  const node = await baseNode([noise()])
  const summary = { type: 'summary', mode: 'probe', target, ok: false }
  try {
    const conn = await node.dial(target, { signal: AbortSignal.timeout(DIAL_MS) })
    summary.connected = { peer: conn.remotePeer.toString(), encryption: conn.encryption, multiplexer: conn.multiplexer }
    const id = await node.services.identify.identify(conn, { signal: AbortSignal.timeout(DIAL_MS) })
    summary.identify = { agentVersion: id.agentVersion, protocolVersion: id.protocolVersion, protocols: id.protocols }
    summary.ping_ms = await node.services.ping.ping(target, { signal: AbortSignal.timeout(DIAL_MS) })
    const streams = []
    // js-libp2p negotiates fully by default; 'optimistic' sends the protocol name and
    // the first bytes together, as js-libp2p does for some of its own protocols
    for (const negotiateFully of [true, false]) {
      for (const protocol of protocols) {
        for (const [kind, bytes] of Object.entries(GARBAGE)) {
          const result = await garbageOn(conn, protocol, kind, bytes, negotiateFully)
          emit({ type: 'stream', ...result })
          streams.push(result)
        }
      }
    }
    summary.streams = streams
    summary.alive = await stillServes(conn, protocols[0])
    summary.ping_after_ms = await node.services.ping.ping(target, { signal: AbortSignal.timeout(DIAL_MS) })
    summary.ok = streams.every((s) => s.ended) && summary.alive.ok
  } catch (err) {
    summary.error = errText(err)
  } finally {
    emit(summary)
    await node.stop()
  }
  return summary.ok
}

async function plaintextDial (target) {
  const node = await baseNode([plaintext()])
  const summary = { type: 'summary', mode: 'plaintext', target, ok: false, refused: false }
  try {
    const conn = await node.dial(target, { signal: AbortSignal.timeout(DIAL_MS) })
    summary.error = `connected with ${conn.encryption}: plaintext was accepted`
  } catch (err) {
    summary.refused = true
    summary.ok = true
    summary.error = errText(err)
  } finally {
    emit(summary)
    await node.stop()
  }
  return summary.ok
}

async function main (argv) {
  const [mode, addr, ...protocols] = argv
  if (!['probe', 'plaintext'].includes(mode) || addr == null || (mode === 'probe' && protocols.length === 0)) {
    process.stderr.write('usage: node peer.mjs probe <multiaddr> <protocol>... | plaintext <multiaddr>\n')
    return 2
  }
  let target
  try {
    target = multiaddr(addr)
  } catch (err) {
    process.stderr.write(`not a multiaddr: ${addr} (${errText(err)})\n`)
    return 2
  }
  const ok = mode === 'probe' ? await probe(target, protocols) : await plaintextDial(target)
  return ok ? 0 : 1
}

process.exitCode = await main(process.argv.slice(2))
