// Drives tcplogserver with the Node.js tcp-log-client@6, unchanged, to show
// that the original server's clients work against it.
//
//   npm install --prefix /some/folder tcp-log-client@6
//   NODE_PATH=/some/folder/node_modules node interop/interop.js
//
// It starts `python3 -m tcplogserver` itself (on a free port, in a temporary
// folder), prints one line a check, and exits 0 only if every check passes.
'use strict'

var assert = require('assert')
var childProcess = require('child_process')
var fs = require('fs')
var os = require('os')
var path = require('path')
var readline = require('readline')
var TCPLogClient = require('tcp-log-client')

var ROOT = path.resolve(__dirname, '..')
var DATA = fs.mkdtempSync(path.join(os.tmpdir(), 'tcplogserver-interop-'))
var TIMEOUT = 15000 // ms any one step may take

// Start the server; resolves to {process, port} once it is listening.
// A follower (of the server at port `follow`) keeps its data in a folder of
// its own.
function startServer (port, follow) {
  var folder = follow ? path.join(DATA, 'follower') : DATA
  var server = childProcess.spawn('python3', [
    '-m', 'tcplogserver', '--port', String(port),
    '--file', path.join(folder, 'log'), '--blobs', path.join(folder, 'blobs')
  ].concat(follow ? ['--follow', '127.0.0.1:' + follow] : []), {
    cwd: ROOT,
    env: Object.assign({}, process.env, { PYTHONPATH: ROOT }),
    stdio: ['ignore', 'pipe', 'inherit']
  })
  return within('the server to start', new Promise(function (resolve, reject) {
    readline.createInterface({ input: server.stdout }).on('line', function (line) {
      var record = JSON.parse(line)
      if (record.msg === 'listening') resolve({ process: server, port: record.port })
    })
    server.on('exit', function (code) {
      reject(new Error('the server exited with status ' + code))
    })
  }))
}

function stopServer (server, signal) {
  return within('the server to stop', new Promise(function (resolve) {
    server.process.removeAllListeners('exit')
    server.process.on('exit', function () { resolve() })
    server.process.kill(signal)
  }))
}

function within (what, promise) {
  var timer
  var timeout = new Promise(function (resolve, reject) {
    timer = setTimeout(function () {
      reject(new Error('timed out waiting for ' + what))
    }, TIMEOUT)
  })
  return Promise.race([promise, timeout]).then(function (value) {
    clearTimeout(timer)
    return value
  }, function (error) {
    clearTimeout(timer)
    throw error
  })
}

// A connected client that records every entry it reads.
function connect (port) {
  var client = new TCPLogClient({
    server: { host: '127.0.0.1', port: port },
    reconnect: { initialDelay: 50, maxDelay: 500 }
  })
  client.entries = []
  client.currentEvents = 0
  client.readStream.on('data', function (chunk) {
    client.entries.push(chunk)
    client.emit('entry', chunk)
  })
  client.on('current', function () { client.currentEvents++ })
  client.on('error', function (error) { client.lastError = error })
  return within('a client to connect', new Promise(function (resolve) {
    client.once('ready', function () { resolve(client) })
    client.connect()
  }))
}

function write (client, entry) {
  return within('a write callback', new Promise(function (resolve, reject) {
    client.write(entry, function (error, index) {
      if (error) reject(error)
      else resolve(index)
    })
  }))
}

// Resolves once the client has read `count` entries in all.
function entriesRead (client, count) {
  return within(count + ' entries to be read', new Promise(function (resolve) {
    function check () {
      if (client.entries.length >= count) {
        client.removeListener('entry', check)
        resolve(client.entries)
      }
    }
    client.on('entry', check)
    check()
  }))
}

function currentReached (client) {
  return within('the current event', new Promise(function (resolve) {
    if (client.currentEvents > 0) resolve()
    else client.once('current', resolve)
  }))
}

function assertIndices (entries, first, last) {
  var indices = entries.map(function (chunk) { return chunk.index })
  var expected = []
  for (var index = first; index <= last; index++) expected.push(index)
  assert.deepStrictEqual(indices, expected)
}

var checks = []
function check (name, body) { checks.push({ name: name, body: body }) }

var state = {}

check('one client writes, with callbacks giving indices, and reads its writes', async function () {
  var writer = state.writer = await connect(state.server.port)
  var indices = []
  for (var n = 1; n <= 3; n++) indices.push(await write(writer, { n: n }))
  assert.deepStrictEqual(indices, [1, 2, 3])
  var entries = await entriesRead(writer, 3)
  assertIndices(entries, 1, 3)
  assert.deepStrictEqual(entries.map(function (c) { return c.entry }),
    [{ n: 1 }, { n: 2 }, { n: 3 }])
})

check('a second client reads earlier writes, gets current, then live writes', async function () {
  var reader = state.reader = await connect(state.server.port)
  await entriesRead(reader, 3)
  await currentReached(reader)
  assert.strictEqual(await write(state.writer, { live: 1 }), 4)
  assert.strictEqual(await write(state.writer, { live: 2 }), 5)
  var entries = await entriesRead(reader, 5)
  assertIndices(entries, 1, 5)
  assert.deepStrictEqual(entries[4].entry, { live: 2 })
})

check('500 pipelined writes are acknowledged in order and read by another client', async function () {
  var writes = []
  for (var n = 0; n < 500; n++) writes.push(write(state.writer, { pipelined: n }))
  var indices = await Promise.all(writes)
  var expected = []
  for (var index = 6; index < 506; index++) expected.push(index)
  assert.deepStrictEqual(indices, expected)
  var entries = await entriesRead(state.reader, 505)
  assertIndices(entries, 1, 505)
  assert.deepStrictEqual(entries[504].entry, { pipelined: 499 })
})

check('a reader sees every entry once across a server kill and restart', async function () {
  var reader = state.reader
  // Listening first: the reader may be back before the server says so.
  var reconnected = within('the reader to reconnect', new Promise(function (resolve) {
    reader.once('ready', resolve)
  }))
  await stopServer(state.server, 'SIGKILL')
  state.server = await startServer(state.server.port)
  await reconnected
  var writer = await connect(state.server.port)
  var indices = []
  for (var n = 0; n < 10; n++) indices.push(await write(writer, { after: n }))
  assert.deepStrictEqual(indices, [506, 507, 508, 509, 510, 511, 512, 513, 514, 515])
  var entries = await entriesRead(reader, 515)
  assertIndices(entries, 1, 515)
  assert.deepStrictEqual(entries[514].entry, { after: 9 })
  writer.destroy()
})

check('a follower serves the same entries, and refuses writes naming its primary', async function () {
  var follower = state.follower = await startServer(0, state.server.port)
  var reader = state.followerReader = await connect(follower.port)
  var entries = await entriesRead(reader, 515)
  assertIndices(entries, 1, 515)
  assert.deepStrictEqual(entries[514].entry, { after: 9 })
  await currentReached(reader)
  var writer = await connect(state.server.port)
  assert.strictEqual(await write(writer, { live: 'followed' }), 516)
  entries = await entriesRead(reader, 516)
  assert.deepStrictEqual(entries[515].entry, { live: 'followed' })
  // tcp-log-client takes a write's error reply for a bad message: it emits
  // it as an error event, and the write's callback is never called.
  var refused = within('the refused write', new Promise(function (resolve) {
    reader.once('error', resolve)
  }))
  reader.write({ refused: true })
  var error = await refused
  assert.match(error.message.error, /^this server follows 127\.0\.0\.1:\d+: append there$/)
  writer.destroy()
})

async function main () {
  var failed = 0
  state.server = await startServer(0)
  for (var i = 0; i < checks.length; i++) {
    try {
      await checks[i].body()
      console.log('ok - ' + checks[i].name)
    } catch (error) {
      failed++
      console.log('not ok - ' + checks[i].name + ': ' + (error.stack || error))
      break // later checks build on earlier ones
    }
  }
  ;['writer', 'reader', 'followerReader'].forEach(function (name) {
    if (state[name]) state[name].destroy()
  })
  if (state.follower) await stopServer(state.follower, 'SIGTERM')
  await stopServer(state.server, 'SIGTERM')
  fs.rmSync(DATA, { recursive: true, force: true })
  console.log(failed ? 'interop: FAILED' : 'interop: ' + checks.length + ' checks passed')
  process.exit(failed ? 1 : 0)
}

// Whatever happens, leave no server behind.
process.on('exit', function () {
  ;[state.server, state.follower].forEach(function (started) {
    var server = started && started.process
    if (server && server.exitCode === null && server.signalCode === null) {
      server.kill('SIGKILL')
    }
  })
})

main().catch(function (error) {
  console.log('interop: FAILED: ' + (error.stack || error))
  process.exit(1)
})
