"""Measure tcplogserver beside its limits and beside Redis Streams.

    python3 bench/bench.py [--quick] [--json] [--dir DIR] [--only NAMES]
                           [--compare PATH]

Everything measured runs as a subprocess on 127.0.0.1, with its data in one
temporary folder (under DIR if given: put it on the disk you care about,
or on /dev/shm to see the server's own cost apart from the disk's).  The
same client code drives every server.  Scenarios:

W1  pipelined writes on one connection (window of 1,000): writes/s
W2  request-response writes on one connection: writes/s, p50 and p99
W3  16 connections writing pipelined at once: writes/s, and storage flushes
    (fsync, fdatasync, syncfs calls) per write
W4  W1 with one more connection, a reader that asked for the whole log
    and a huge count and then never reads from its socket, and W1 without
    it, in turns on the same server (4 runs of each, of half W1's writes,
    once the reader's socket buffers are full): writes/s of the best run
    of each, and the ratio (tcplogserver only)
W5  synchronous replication: W1 and W2 on a primary with one follower
    (both on this machine, on files in the same folders), the primary
    started with --sync-replicas 1 and with 0 in turns, restarted on the
    same files each time (rounds: 2, or 3 in a full run): the best
    round's writes/s of each, their ratio, and W2's p50 with each and
    what synchronous replication adds to it, beside the follower's own
    W2 p50 as a primary (one round trip and a commit's flushes)
    (tcplogserver only)
W6  monitoring: W1 on a server with --metrics-port, its /metrics read
    at W1's start and once a second meanwhile, and on one without, in
    turns, restarted on the same files each time (4 rounds, or 6 in a
    full run): the best round's writes/s of each and their ratio, the
    least server CPU per 1,000 writes of each and their ratio, and the
    time a /metrics page took (tcplogserver only)
W7  idempotent writes: W1 with every write marked "idempotent" and given
    an id of its own (a random prefix for the run and a counter), plain
    W1, and plain W1 under ids as long as those (not marked), in turns on
    one server (4 rounds, or 6 in a full run, each kind first in turn,
    after an unmeasured run of each): the median writes/s of each, and the
    idempotent runs' over each plain kind's; and the server's memory
    (RSS) after a warm-up of 65,536 plain writes (as many entries as it
    keeps in memory for readers) and after 100,000 idempotent writes
    more, with --idempotence-window 100000 (the default: all their ids
    kept) and with --idempotence-window 0 (none kept): what the ids added,
    the first server's growth less the second's, and that over 100,000,
    in bytes per id (tcplogserver only)
R1  catch-up read of the whole log on one connection: entries/s
F1  fan-out: 100 tailing readers, one writer at 1,000 writes/s (in a
    process of its own, so that it sends on time): latency from append
    to delivery (p50, p99, max), missing or duplicate deliveries, and
    the CPU the server and the readers (all in the bench's process) took
    a second meanwhile; then the same with 500 readers
C1  2,000 idle connections: server memory (RSS) and threads, before and
    with them, and a write still served
F2  follower catch-up: a primary filled with 100,000 entries by W1's
    pipelined writes (the fill's writes/s reported beside, as F2's W1),
    then a follower (--follow) started on empty files: entries/s from its
    start until a read from it has the last entry, and the ratio to the
    fill's W1 (tcplogserver only)
L1  follower lag: W1's writes to F2's primary for 10 s, its follower
    caught up: the time from the primary's acknowledgement of each write
    to a reader tailing the follower receiving it (p50, p99, max, and the
    p99 of the first and of the last third of the writes, to see it
    grow), and missing or duplicate deliveries; and the same with the
    reader on the primary itself, which is what the harness and a read
    take (tcplogserver only)
S1  start-up on a log of 1,000,000 entries: time until a read is answered
    (the median of three starts)
A1  the Python clients, on a server of their own: append_many of W1's
    count of entries through Client and through AsyncClient, then a
    catch-up read of the entries just appended through each, in turns
    (rounds alternating which goes first): the best round's rate of each,
    and AsyncClient's over Client's, of the best rounds and of the medians
    (tcplogserver only)

Baselines, measured in the same run:

redis     redis-server (--appendonly yes --appendfsync always), over RESP:
          XADD for writes, XRANGE for the catch-up read, XREAD BLOCK for
          the readers.  Skipped, and said so, if redis-server is missing.
ceiling   the work a write costs with no network, in one process, in the
          same folder as the server's data: parse, canonicalize, hash,
          make the blob under its name, append the line, and the same
          flush per batch of 1,000 as the server (one of the file
          system); and beside it, in turns, the sequence before it
          (the blob under a temporary name, renamed, and three flushes).
floor     the ceiling with a flush for each write, as W2's commits are,
          taken just before and just after W2, of both sequences: what W2
          would reach with no network and no server.
null      a server that acknowledges each write without storing anything:
          the most the client harness can measure.

--only W1,R1 runs only the scenarios named (and the baselines W1 is
measured against, when W1 is one of them); R1 alone reads W1's count of
entries, written for it unmeasured, and L1 runs F2 first, on whose
follower it runs.

--compare PATH measures another version of the server beside this one:
PATH is a tcplogserver.py, say from a checkout of an older commit
(git worktree add /tmp/old COMMIT).  After the run above, W1, W2 (with
its flushes per write: fsync, fdatasync and syncfs calls), R1 and F1
run on both, in rounds (4, or 6 in a full run): each round starts a
server of each on new files in the same folder, then runs each scenario
on one and then on the other, the first changing from round to round.
W1 and W2 run in slices (4, or 10 in a full run): each slice of the
round's writes goes to one server and then the same count to the other,
the first changing from slice to slice.  R1 there reads W1's log, the
best of 5 reads, served from memory (a server keeps the latest entries
there); then again from a server just restarted on the same files,
which serves them from the files.  F1 runs on that server.  The table
(and "compare" in the JSON) gives the best round of each, new (the
module beside this folder) over old, the same ratio for the medians,
and the lowest and highest ratio within a round, which shows how much
of it is noise; for W1 and W2, also the median ratio of the slices run
back to back ("paired"), which a disk's swings from one second to the
next move least.  Each server says which file it
imported, and the bench checks that it is the one asked for.

Standard library only; the server is the tcplogserver.py beside this
folder.
"""

import argparse
import asyncio
import ctypes
import itertools
import json
import multiprocessing
import os
import re
import resource
import selectors
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import tcplogserver  # the module beside this folder

PAD = 'x' * 48          # makes a W entry's canonical JSON about 120 bytes


def entry(n, salt):
    return {'n': n, 'pad': PAD, 'salt': salt, 'user': 'someone@example.com'}


def free_port():
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


def connect(port, attempts=2000):
    """A connection to port, retrying while the server starts."""
    for _ in range(attempts):
        try:
            sock = socket.create_connection(('127.0.0.1', port), timeout=60)
        except ConnectionRefusedError:
            time.sleep(0.005)
            continue
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    raise RuntimeError('nothing listens on port %d' % port)


def process_cpu(pid):
    """User and system CPU seconds a process has used."""
    with open('/proc/%d/stat' % pid) as stat:
        fields = stat.read().rsplit(')', 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf('SC_CLK_TCK')


def process_memory(pid):
    """(RSS in KiB, threads) of a process."""
    values = {}
    with open('/proc/%d/status' % pid) as status:
        for line in status:
            key, _, value = line.partition(':')
            values[key] = value.split()[0] if value.split() else ''
    return int(values['VmRSS']), int(values['Threads'])


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


# ----------------------------------------------------------------------------
# Servers
# ----------------------------------------------------------------------------

# Runs the tcplogserver.py named by the first argument, with its flush
# functions counted; SIGUSR1 prints the counts.  Nothing else in the server
# changes.  The module's folder takes the place of the current folder that
# -c puts first on the path, so that this module is the one imported.  The
# first line printed says which file was imported, and which flush
# functions were not found (a version of the module may have moved them):
# those are left alone, and the flushes go uncounted.
COUNTED_SERVER = r'''
import collections, json, os, signal, sys, threading
module = sys.argv.pop(1)
sys.path[0] = os.path.dirname(module)
import tcplogserver
counts = collections.Counter()
uncounted = []
def count(where, name):
    owner, attribute = tcplogserver, where
    if '.' in where:
        owner, attribute = where.split('.')
        owner = getattr(tcplogserver, owner, None)
    function = getattr(owner, attribute, None)
    if not callable(function):
        uncounted.append(where)
        return
    def flush(*args, **kwargs):
        counts[name] += 1
        return function(*args, **kwargs)
    setattr(owner, attribute, flush)
# The system calls themselves, as strace -e trace=fsync,fdatasync,syncfs
# would count them.
count('os.fsync', 'fsync')
count('os.fdatasync', 'fdatasync')
count('_syncfs', 'syncfs')
print(json.dumps({'msg': 'module',
                  'file': os.path.abspath(tcplogserver.__file__),
                  'version': getattr(tcplogserver, '__version__', None),
                  'uncounted': uncounted}), flush=True)
def report():
    # Blocked in every thread, SIGUSR1 is taken here, whichever thread the
    # kernel would have given it to.
    while True:
        signal.sigwait({signal.SIGUSR1})
        # One write, not print's two: the server logs from other threads.
        sys.stdout.write(json.dumps({'msg': 'flushes', **counts}) + '\n')
        sys.stdout.flush()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
threading.Thread(target=report, daemon=True).start()
sys.argv[0] = 'tcplogserver'
sys.exit(tcplogserver.main())
'''

# The module measured unless told otherwise: the one beside this folder.
MODULE = os.path.join(ROOT, 'tcplogserver.py')


class Server:
    """A server subprocess on a port of its own."""

    kind = None

    def __init__(self, command, port, **popen):
        self.port = port
        self.started = time.perf_counter()
        self.process = subprocess.Popen(command, **popen)
        connect(port).close()

    @property
    def pid(self):
        return self.process.pid

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class LogServer(Server):
    kind = 'tcplog'

    def __init__(self, folder, port=None, sync='always', module=MODULE,
                 options=(), log_level='warn'):
        port = port or free_port()
        self.records = []
        self._flushes = threading.Condition()
        self.logged = []            # (when the bench read it, record)
        self._logged = threading.Condition()
        self._module = threading.Event()
        super().__init__(
            [sys.executable, '-c', COUNTED_SERVER, module, '--port', str(port),
             '--file', os.path.join(folder, 'log'),
             '--blobs', os.path.join(folder, 'blobs'), '--sync', sync,
             '--log-level', log_level, *options],
            port, stdout=subprocess.PIPE,
            env=dict(os.environ, PYTHONPATH=os.path.dirname(module)))
        threading.Thread(target=self._drain, daemon=True).start()
        if not self._module.wait(30):
            self.stop()
            raise RuntimeError('the server does not say what it runs')
        if not os.path.samefile(self.module['file'], module):
            self.stop()
            raise RuntimeError('the server runs %s, not %s'
                               % (self.module['file'], module))
        self.uncounted = self.module['uncounted']

    def _drain(self):
        for line in self.process.stdout:
            record = json.loads(line)
            if record.get('msg') == 'module':
                self.module = record
                self._module.set()
            elif record.get('msg') == 'flushes':
                with self._flushes:
                    self.records.append(record)
                    self._flushes.notify_all()
            else:
                with self._logged:
                    self.logged.append((time.perf_counter(), record))
                    self._logged.notify_all()

    def first_logged(self, message, timeout):
        """(when the bench read it, the record) of the first record with
        message that the server logged, waiting up to timeout seconds for
        it; None if there is none."""
        def find():
            return next((each for each in self.logged
                         if each[1].get('msg') == message), None)
        with self._logged:
            return self._logged.wait_for(find, timeout)

    def flushes(self):
        """How many storage flushes the server has made so far; None if
        some of its flush functions could not be counted."""
        if self.uncounted:
            return None
        with self._flushes:
            seen = len(self.records)
            for _ in range(6):
                self.process.send_signal(signal.SIGUSR1)
                if self._flushes.wait_for(lambda: len(self.records) > seen,
                                          5):
                    break
            else:
                raise RuntimeError('the server does not report its flushes')
            record = self.records[-1]
        return sum(v for k, v in record.items() if k != 'msg')


class RedisServer(Server):
    kind = 'redis'

    def __init__(self, folder):
        port = free_port()
        os.makedirs(folder, exist_ok=True)
        super().__init__(
            ['redis-server', '--port', str(port), '--bind', '127.0.0.1',
             '--dir', folder, '--appendonly', 'yes',
             '--appendfsync', 'always', '--save', '', '--maxclients',
             '10000', '--protected-mode', 'no'],
            port, stdout=subprocess.DEVNULL)


NULL_SERVER = r'''
import selectors, socket, sys
listener = socket.create_server(('127.0.0.1', int(sys.argv[1])))
listener.setblocking(False)
selector = selectors.DefaultSelector()
selector.register(listener, selectors.EVENT_READ)
index = 0
partial = {}
while True:
    for key, _ in selector.select():
        if key.fileobj is listener:
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            selector.register(conn, selectors.EVENT_READ)
            partial[conn] = b''
            continue
        conn = key.fileobj
        data = conn.recv(1 << 16)
        if not data:
            selector.unregister(conn)
            conn.close()
            continue
        lines = (partial[conn] + data).split(b'\n')
        partial[conn] = lines.pop()
        replies = []
        for line in lines:
            start = line.find(b'"id":"') + 6
            index += 1
            replies.append(b'{"id":"%s","index":%d}\n'
                           % (line[start:line.find(b'"', start)], index))
        conn.setblocking(True)
        conn.sendall(b''.join(replies))
        conn.setblocking(False)
'''


class NullServer(Server):
    kind = 'tcplog'

    def __init__(self):
        port = free_port()
        super().__init__([sys.executable, '-c', NULL_SERVER, str(port)], port)


# ----------------------------------------------------------------------------
# Protocols: how the harness writes and reads, for each kind of server
# ----------------------------------------------------------------------------

def resp(*parts):
    out = [b'*%d\r\n' % len(parts)]
    for part in parts:
        part = part if isinstance(part, bytes) else str(part).encode()
        out.append(b'$%d\r\n%s\r\n' % (len(part), part))
    return b''.join(out)


class RespParser:
    """Incremental parser of RESP replies."""

    def __init__(self):
        self.buffer = b''
        self.offset = 0

    def feed(self, data):
        self.buffer = self.buffer[self.offset:] + data
        self.offset = 0

    def replies(self):
        while True:
            start = self.offset
            try:
                reply = self._parse()
            except IndexError:
                self.offset = start
                return
            yield reply

    def _line(self):
        end = self.buffer.find(b'\r\n', self.offset)
        if end < 0:
            raise IndexError
        line = self.buffer[self.offset:end]
        self.offset = end + 2
        return line

    def _parse(self):
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind in (b'+', b'-', b':'):
            return rest
        if kind == b'$':
            length = int(rest)
            if length < 0:
                return None
            if len(self.buffer) < self.offset + length + 2:
                raise IndexError
            value = self.buffer[self.offset:self.offset + length]
            self.offset += length + 2
            return value
        if kind == b'*':
            count = int(rest)
            if count < 0:
                return None
            return [self._parse() for _ in range(count)]
        raise ValueError('bad RESP: %r' % line)


class LogProtocol:
    """tcp-log-server's protocol."""

    @staticmethod
    def write(n, data):
        return b'{"id":"%d","entry":%s}\n' % (n, data)

    @staticmethod
    def write_with_id(key, data):
        """A plain write under an id (bytes) as long as an idempotent
        write's."""
        return b'{"id":"%s","entry":%s}\n' % (key, data)

    @staticmethod
    def write_idempotent(key, data):
        """A write the server stores once, whatever the times key (bytes)
        comes back with the same entry."""
        return b'{"id":"%s","entry":%s,"idempotent":true}\n' % (key, data)

    @staticmethod
    def count_replies(data):
        return data.count(b'\n')


class RedisProtocol:
    """Redis Streams: XADD for a write."""

    @staticmethod
    def write(n, data):
        return resp(b'XADD', b'log', b'*', b'e', data)

    @staticmethod
    def count_replies(data):
        # Each XADD reply is a bulk string: two line ends.
        return data.count(b'\r\n') // 2


def protocol_of(server):
    return RedisProtocol if server.kind == 'redis' else LogProtocol


# ----------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------

def entries_json(count, salt):
    return [tcplogserver.canonical_json(entry(n, salt)) for n in range(count)]


def pipelined_writes(server, datas, connections=1, window=1000,
                     received=None, seconds=None, ids=None, marked=True):
    """Send datas over connections, window outstanding on each; writes/s.
    Each reply's bytes, as received, go to the list received if given, as
    (time.perf_counter() then, bytes).  Given seconds, no write is sent
    after that many: the rate is then that of those sent before.  Given
    ids, an iterator of bytes, each write takes the next as its id and is
    marked idempotent (tcplogserver only), unless marked is false."""
    protocol = protocol_of(server)
    share = -(-len(datas) // connections)
    selector = selectors.DefaultSelector()
    states = []
    for number in range(connections):
        sock = connect(server.port)
        sock.setblocking(False)
        mine = datas[number * share:(number + 1) * share]
        if ids is None:
            messages = [protocol.write(n, data)
                        for n, data in enumerate(mine)]
        else:
            # mine first: zip takes no id beyond the last write.
            write = protocol.write_idempotent if marked \
                else protocol.write_with_id
            messages = [write(key, data) for data, key in zip(mine, ids)]
        state = {'sock': sock, 'messages': messages, 'sent': 0,
                 'acked': 0, 'pending': b'', 'tail': b'',
                 'registered': selectors.EVENT_READ}
        states.append(state)
        selector.register(sock, selectors.EVENT_READ, state)
    started = time.perf_counter()
    deadline = None if seconds is None else started + seconds
    busy = len(states)
    while busy:
        if deadline is not None and time.perf_counter() > deadline:
            # What has been sent is all there is to send.
            deadline = None
            for state in states:
                if state['sent'] < len(state['messages']):
                    del state['messages'][state['sent']:]
                    if state['acked'] >= state['sent']:
                        selector.unregister(state['sock'])
                        busy -= 1
            if not busy:
                break
        for state in states:
            # Send until the window is full or the socket takes no more.
            sock = state['sock']
            while True:
                if not state['pending']:
                    room = window - (state['sent'] - state['acked'])
                    if state['sent'] >= len(state['messages']) or room <= 0:
                        break
                    chunk = state['messages'][state['sent']:state['sent']
                                              + min(room, 100)]
                    state['pending'] = b''.join(chunk)
                    state['sent'] += len(chunk)
                try:
                    written = sock.send(state['pending'])
                except BlockingIOError:
                    break
                state['pending'] = state['pending'][written:]
                if state['pending']:
                    break
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE
                                             if state['pending'] else 0)
            if state['registered'] != events and state['acked'] < len(
                    state['messages']):
                selector.modify(sock, events, state)
                state['registered'] = events
        for key, events in selector.select(timeout=1):
            if not events & selectors.EVENT_READ:
                continue            # room to send: the loop above sends
            state = key.data
            data = key.fileobj.recv(1 << 16)
            if received is not None:
                received.append((time.perf_counter(), data))
            if not data:
                raise RuntimeError('the server closed a connection')
            state['acked'] += protocol.count_replies(state['tail'] + data) \
                - protocol.count_replies(state['tail'])
            state['tail'] = data[-1:]
            if state['acked'] >= len(state['messages']):
                selector.unregister(key.fileobj)
                busy -= 1
    elapsed = time.perf_counter() - started
    for state in states:
        state['sock'].close()
    return sum(len(state['messages']) for state in states) / elapsed


def request_response(server, datas, latencies=None):
    """One write at a time: (writes/s, p50 ms, p99 ms).  Each write's
    latency, in seconds, also goes to the list latencies if given."""
    protocol = protocol_of(server)
    sock = connect(server.port)
    latencies = [] if latencies is None else latencies
    before = len(latencies)
    started = time.perf_counter()
    for n, data in enumerate(datas):
        sent = time.perf_counter()
        sock.sendall(protocol.write(n, data))
        received = b''
        while protocol.count_replies(received) < 1:
            received += sock.recv(1 << 16)
        latencies.append(time.perf_counter() - sent)
    elapsed = time.perf_counter() - started
    sock.close()
    mine = latencies[before:]
    return (len(datas) / elapsed, 1000 * percentile(mine, 0.5),
            1000 * percentile(mine, 0.99))


def catch_up_read(server, count):
    """Read the whole log (count entries) on one connection: entries/s."""
    sock = connect(server.port)
    started = time.perf_counter()
    if server.kind == 'redis':
        parser, got, last = RespParser(), 0, b'-'
        while got < count:
            sock.sendall(resp(b'XRANGE', b'log',
                              b'(' + last if got else b'-', b'+',
                              b'COUNT', b'1000'))
            while True:
                replies = list(parser.replies())
                if replies:
                    break
                parser.feed(sock.recv(1 << 16))
            got += len(replies[0])
            last = replies[0][-1][0]
    else:
        sock.sendall(b'{"from":1,"read":%d}\n' % count)
        received, tail = 0, b''
        while received < count + 1:          # the entries, then the head
            data = sock.recv(1 << 16)
            received += (tail + data).count(b'\n') - tail.count(b'\n')
            tail = data[-1:]
    elapsed = time.perf_counter() - started
    sock.close()
    return count / elapsed


FAN_OUT_ENTRY = re.compile(rb'"n":(\d+),"t":(\d+)')


def fan_out(server, readers, rate, seconds):
    """Readers tail, one writer writes at rate: latencies and losses."""
    total = int(rate * seconds)
    selector = selectors.DefaultSelector()
    socks = []
    if server.kind == 'redis':
        for _ in range(readers):
            sock = connect(server.port)
            sock.sendall(resp(b'XREAD', b'BLOCK', b'0', b'STREAMS', b'fan',
                              b'$'))
            socks.append(sock)
    else:
        # The readers start after a marker entry, at the head.
        marker = connect(server.port)
        marker.sendall(b'{"id":"marker","entry":{"marker":true}}\n')
        reply = b''
        while not reply.endswith(b'\n'):
            reply += marker.recv(1 << 16)
        first = json.loads(reply)['index'] + 1
        marker.close()
        for _ in range(readers):
            sock = connect(server.port)
            sock.sendall(b'{"from":%d,"read":%d}\n' % (first, total))
            socks.append(sock)
    seen = [{} for _ in range(readers)]
    latencies = []
    for number, sock in enumerate(socks):
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ,
                          {'number': number, 'tail': b'',
                           'parser': RespParser(), 'last': None})
    # Let every read reach the head before writing.
    time.sleep(0.5)

    def write():
        sock = connect(server.port)
        started = time.perf_counter()
        for n in range(total):
            delay = started + n / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            data = b'{"n":%d,"t":%d}' % (n, time.time_ns())
            if server.kind == 'redis':
                sock.sendall(resp(b'XADD', b'fan', b'*', b'e', data))
            else:
                sock.sendall(b'{"id":"f","entry":%s}\n' % data)
        sock.shutdown(socket.SHUT_WR)
        while sock.recv(1 << 16):
            pass
        sock.close()
    # A process of its own: a thread would wait for this one's interpreter
    # lock, busy with the deliveries, and send late, which a reader would
    # measure as the server's latency.
    writer = multiprocessing.get_context('fork').Process(target=write)
    server_cpu, readers_cpu = process_cpu(server.pid), time.process_time()
    writing = time.perf_counter()
    writer.start()
    deadline = time.monotonic() + seconds + 10
    delivered = 0
    while delivered < total * readers and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            now = time.time_ns()
            state = key.data
            data = key.fileobj.recv(1 << 16)
            if server.kind == 'redis':
                state['parser'].feed(data)
                for reply in state['parser'].replies():
                    for _, items in reply or []:
                        for item_id, fields in items:
                            n, t = map(int, FAN_OUT_ENTRY.search(
                                fields[1]).groups())
                            seen[state['number']][n] = \
                                seen[state['number']].get(n, 0) + 1
                            latencies.append(now - t)
                            delivered += 1
                            state['last'] = item_id
                    key.fileobj.setblocking(True)
                    key.fileobj.sendall(resp(b'XREAD', b'BLOCK', b'0',
                                             b'STREAMS', b'fan',
                                             state['last']))
                    key.fileobj.setblocking(False)
            else:
                data = state['tail'] + data
                end = data.rfind(b'\n') + 1
                state['tail'] = data[end:]
                for n, t in FAN_OUT_ENTRY.findall(data, 0, end):
                    n = int(n)
                    seen[state['number']][n] = \
                        seen[state['number']].get(n, 0) + 1
                    latencies.append(now - int(t))
                    delivered += 1
    writer.join()
    writing = time.perf_counter() - writing
    server_cpu = (process_cpu(server.pid) - server_cpu) / writing
    readers_cpu = (time.process_time() - readers_cpu) / writing
    for sock in socks:
        sock.close()
    missing = sum(1 for reader in seen for n in range(total)
                  if n not in reader)
    duplicate = sum(count - 1 for reader in seen for count in reader.values()
                    if count > 1)
    return {'p50_ms': percentile(latencies, 0.5) / 1e6,
            'p99_ms': percentile(latencies, 0.99) / 1e6,
            'max_ms': max(latencies) / 1e6,
            'missing': missing, 'duplicate': duplicate,
            'server_cpu': server_cpu, 'readers_cpu': readers_cpu}


def held_for(sock, server):
    """Bytes the kernel holds between sock and the server's end of it: what
    sock has received but not read, and what the server has sent, or asked
    to send, that sock has not taken (from /proc/net/tcp)."""
    mine, theirs = sock.getsockname()[1], server.port
    held = 0
    with open('/proc/net/tcp') as connections:
        next(connections)
        for line in connections:
            fields = line.split()
            ends = (int(fields[1].rsplit(':', 1)[1], 16),
                    int(fields[2].rsplit(':', 1)[1], 16))
            sending, receiving = (int(n, 16) for n in fields[4].split(':'))
            if ends == (mine, theirs):
                held += receiving
            elif ends == (theirs, mine):
                held += sending
    return held


def server_threads_down_to(server, threads, timeout=10):
    """Wait until the server runs no more than threads threads (those of
    connections just closed end on their own time)."""
    deadline = time.monotonic() + timeout
    while (process_memory(server.pid)[1] > threads
           and time.monotonic() < deadline):
        time.sleep(0.02)


def stalled_reader(server, count, pairs, salt):
    """W1 (count writes) with one more connection, a reader that asked for
    the whole log and never reads, and W1 without it, in turns (pairs of
    each): the writes/s of each run, and what the kernel held for the
    reader once it had stalled."""
    # 8 MiB in the log first, more than the socket buffers take: the
    # reader's read fills them and blocks before any run is timed.
    pipelined_writes(server, [
        tcplogserver.canonical_json({'n': n, 'pad': 'x' * 2000, 'salt': salt})
        for n in range(4096)])
    time.sleep(0.2)
    threads = process_memory(server.pid)[1]
    runs = {'with': [], 'without': []}
    held = []
    for number in range(pairs):
        for stalled in (True, False) if number % 2 == 0 else (False, True):
            datas = entries_json(count, 'w4-%d-%s-%s'
                                 % (number, stalled, salt))
            server_threads_down_to(server, threads)
            if not stalled:
                runs['without'].append(pipelined_writes(server, datas))
                continue
            reader = socket.socket()
            try:
                reader.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                reader.connect(('127.0.0.1', server.port))
                reader.sendall(b'{"from":1,"read":%d}\n' % (1 << 40))
                # Stalled once nothing more reaches the socket buffers.
                seen, same = None, 0
                deadline = time.monotonic() + 30
                while same < 5:
                    if time.monotonic() > deadline:
                        raise RuntimeError('the reader does not stall')
                    time.sleep(0.02)
                    now = held_for(reader, server)
                    same = same + 1 if now == seen and now else 0
                    seen = now
                held.append(seen)
                runs['with'].append(pipelined_writes(server, datas))
            finally:
                # Gone with a reset, as a client that dies would go.
                reader.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                  struct.pack('ii', 1, 0))
                reader.close()
    best = {key: max(values) for key, values in runs.items()}
    return {'with': best['with'], 'without': best['without'],
            'ratio': best['with'] / best['without'],
            'runs_with': runs['with'], 'runs_without': runs['without'],
            'entries_per_run': count,
            'held_kib': statistics.median(held) / 1024}


def idle_connections(server, count):
    """Memory and threads with count idle connections; a write served."""
    before = process_memory(server.pid)
    socks = [connect(server.port) for _ in range(count)]
    if server.kind == 'tcplog':
        # Wait until the server has a thread for each.
        deadline = time.monotonic() + 60
        while (process_memory(server.pid)[1] < before[1] + count
               and time.monotonic() < deadline):
            time.sleep(0.05)
    else:
        time.sleep(1)
    during = process_memory(server.pid)
    protocol = protocol_of(server)
    sock = connect(server.port)
    sock.sendall(protocol.write(0, b'{"idle":true}'))
    reply = sock.recv(1 << 16)
    # An acknowledgement, not a refusal ("too many connections").
    served = (protocol.count_replies(reply) == 1
              and not reply.startswith((b'{"error"', b'-')))
    sock.close()
    for each in socks:
        each.close()
    return {'rss_kib_before': before[0], 'threads_before': before[1],
            'rss_kib_with': during[0], 'threads_with': during[1],
            'kib_per_connection': (during[0] - before[0]) / count,
            'write_served': served}


FOLLOWED_ENTRY = re.compile(rb'\{"index":(\d+),"entry"')
ACKNOWLEDGED = re.compile(rb'"index":(\d+)')


def follower_catch_up(primary, folder, count):
    """F2: a follower of primary (which holds count entries) started on
    empty files in folder; the seconds from its start until a read from it
    has entry count, and what it logged on catching up.  The follower is
    left running, for L1."""
    port = free_port()
    reached = {}

    def read():
        # Connected as soon as the follower listens, a read of its last
        # entry gets it the moment the follower has it.
        try:
            sock = connect(port)
            sock.settimeout(600)
            sock.sendall(b'{"from":%d,"read":1}\n' % count)
            answer, last = b'', b'{"index":%d,' % count
            while last not in answer:
                data = sock.recv(1 << 16)
                if not data:
                    raise RuntimeError('the follower ended the read')
                answer = answer[-len(last):] + data
            reached['at'] = time.perf_counter()
            sock.close()
        except (OSError, RuntimeError) as error:
            reached['error'] = error
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    follower = LogServer(folder, port=port, log_level='info', options=(
        '--follow', '127.0.0.1:%d' % primary.port))
    try:
        reader.join()
        if 'error' in reached:
            raise RuntimeError('F2: %s' % reached['error'])
        cpu = process_cpu(follower.pid)
        seconds = reached['at'] - follower.started
        # The follower's own record of it, if it made one.
        logged = follower.first_logged('caught up with the primary', 10)
        record = logged[1] if logged else {}
        flushes = follower.flushes()
    except BaseException:
        follower.stop()
        raise
    return follower, {
        'entries': count, 'seconds': seconds, 'rate': count / seconds,
        'cpu_s_per_1000_entries': cpu * 1000 / count,
        'flushes_per_entry': None if flushes is None else flushes / count,
        'logged_after_s': logged[0] - follower.started if logged else None,
        'logged_head': record.get('head'),
        'logged_copied': record.get('copied'),
        'logged_seconds': record.get('seconds'),
        'logged_rate': count / record['seconds']
        if record.get('seconds') else None}


def follower_lag(primary, follower, first, datas, seconds):
    """L1: datas written pipelined to primary, as in W1, for seconds at
    most, while a reader tails follower from index first (the primary's
    head + 1): for each entry, the seconds from the primary's
    acknowledgement to the reader receiving it from the follower."""
    sock = connect(follower.port)
    sock.settimeout(30)
    sock.sendall(b'{"from":%d,"read":%d}\n' % (first, len(datas)))
    # The read is at the follower's head before the writes begin.
    answer = b''
    while b'{"current":true}\n' not in answer:
        data = sock.recv(1 << 16)
        if not data:
            raise RuntimeError('the follower ended the read')
        answer += data
    acknowledged, written = [], {}

    def write():
        try:
            rate = pipelined_writes(primary, datas, received=acknowledged,
                                    seconds=seconds)
            written['count'] = sum(data.count(b'\n')
                                   for _, data in acknowledged)
            written['rate'] = rate
        except (OSError, RuntimeError) as error:
            written['error'] = error
    writer = threading.Thread(target=write)
    writer.start()
    # Lines are parsed once the run is over: while it runs, each chunk is
    # kept with the time it came, cut after its last whole line, and only
    # the last index in it is looked at.
    chunks, tail, last = [], b'', first - 1
    sock.settimeout(0.2)
    quiet = 0
    while 'count' not in written or last < first + written['count'] - 1:
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            if not writer.is_alive():
                if 'count' not in written or quiet >= 50:
                    break       # what has not come by now is missing
                quiet += 1
            continue
        now = time.perf_counter()
        if not data:
            break
        quiet = 0
        data = tail + data
        end = data.rfind(b'\n') + 1
        tail = data[end:]
        chunks.append((now, data, end))
        at = data.rfind(b'{"index":', 0, end)
        if at >= 0:
            last = int(data[at + 9:data.index(b',', at)])
        if data.find(b'{"head":', 0, end) >= 0:
            break
    writer.join()
    sock.close()
    if 'error' in written:
        raise RuntimeError('L1: %s' % written['error'])
    acked, pending = {}, b''
    for when, data in acknowledged:
        pending += data
        end = pending.rfind(b'\n') + 1
        for index in ACKNOWLEDGED.findall(pending, 0, end):
            acked[int(index)] = when
        pending = pending[end:]
    received, duplicate = {}, 0
    for when, data, end in chunks:
        for index in FOLLOWED_ENTRY.findall(data, 0, end):
            index = int(index)
            if index in received:
                duplicate += 1
            else:
                received[index] = when
    if len(acked) != written['count']:
        raise RuntimeError('L1: %d writes acknowledged of %d'
                           % (len(acked), written['count']))
    # In the order of the writes.
    lags = [received[index] - acked[index] for index in sorted(acked)
            if index in received]
    third = max(1, len(lags) // 3)
    early, late = lags[:third], lags[-third:]
    return {
        'writes': len(acked), 'rate': written['rate'],
        'seconds': len(acked) / written['rate'],
        'p50_ms': 1000 * percentile(lags, 0.5),
        'p99_ms': 1000 * percentile(lags, 0.99),
        'max_ms': 1000 * max(lags), 'min_ms': 1000 * min(lags),
        'p99_first_third_ms': 1000 * percentile(early, 0.99),
        'p99_last_third_ms': 1000 * percentile(late, 0.99),
        'growth': percentile(late, 0.99) / percentile(early, 0.99),
        'missing': len(acked) - len(lags), 'duplicate': duplicate}


def follow(folder, sizes, salt, lag, say):
    """F2, then L1 if lag, on a primary and its follower in folder."""
    count = sizes['f2']
    results = {}
    primary = LogServer(os.path.join(folder, 'primary'))
    follower = None
    try:
        say('tcplog: F2 filling a primary with %d entries, as W1' % count)
        cpu = process_cpu(primary.pid)
        w1 = pipelined_writes(primary, entries_json(count, salt))
        cpu = (process_cpu(primary.pid) - cpu) * 1000 / count
        say('tcplog: F2 a follower, from empty files, until it has them')
        follower, results['f2'] = follower_catch_up(
            primary, os.path.join(folder, 'follower'), count)
        results['f2'].update({'w1': w1, 'ratio': results['f2']['rate'] / w1,
                              'w1_cpu_s_per_1000_writes': cpu})
        if lag:
            # Enough for l1_seconds of writes at 1.5 times the fill's rate.
            seconds = sizes['l1_seconds']
            datas = entries_json(int(w1 * seconds * 1.5), 'l1' + salt)
            say('tcplog: L1 writes to the primary for %d s, a reader tailing '
                'the follower' % seconds)
            results['l1'] = follower_lag(primary, follower, count + 1, datas,
                                         seconds)
            del datas
            # The same with the reader on the primary itself: what the
            # harness and a read cost, with no follower between.
            say('tcplog: L1 again, the reader tailing the primary')
            results['l1']['primary'] = follower_lag(
                primary, primary, count + results['l1']['writes'] + 1,
                entries_json(int(w1 * seconds * 1.5), 'l1p' + salt), seconds)
    finally:
        if follower is not None:
            follower.stop()
        primary.stop()
    return results


def sync_replication(folder, sizes, salt, say):
    """W5: W1 and W2 with --sync-replicas 1 and 0, in turns."""
    runs = {1: [], 0: []}
    for number in range(sizes['w5_rounds']):
        for sync in ((1, 0) if number % 2 == 0 else (0, 1)):
            say('tcplog: W5 round %d, --sync-replicas %d' % (number + 1,
                                                             sync))
            tag = '%s%d%d' % (salt, number, sync)
            primary = LogServer(os.path.join(folder, 'primary'),
                                options=('--sync-replicas', str(sync)),
                                log_level='info')
            follower = None
            try:
                follower = LogServer(
                    os.path.join(folder, 'follower'),
                    options=('--follow', '127.0.0.1:%d' % primary.port))
                if primary.first_logged('a follower reports to this server',
                                        30) is None:
                    raise RuntimeError('the follower does not report')
                w1 = pipelined_writes(
                    primary, entries_json(sizes['w5_w1'], 'w1' + tag))
                rate, p50, p99 = request_response(
                    primary, entries_json(sizes['w5_w2'], 'w2' + tag))
            finally:
                if follower is not None:
                    follower.stop()
                primary.stop()
            runs[sync].append({'w1': w1, 'w2': rate, 'w2_p50_ms': p50,
                               'w2_p99_ms': p99})
    # The follower's own commit and a round trip: W2 on it as a primary.
    alone = LogServer(os.path.join(folder, 'follower'))
    try:
        _, own_p50, _ = request_response(
            alone, entries_json(sizes['w5_w2'], 'alone' + salt))
    finally:
        alone.stop()
    best = {sync: {key: (min if key.endswith('_ms') else max)(
        run[key] for run in runs[sync]) for key in runs[sync][0]}
        for sync in runs}
    return {'sync': best[1], 'async': best[0], 'rounds': runs,
            'w1_ratio': best[1]['w1'] / best[0]['w1'],
            'w2_ratio': best[1]['w2'] / best[0]['w2'],
            'w2_added_p50_ms': best[1]['w2_p50_ms'] - best[0]['w2_p50_ms'],
            'follower_w2_p50_ms': own_p50}


def monitored(folder, sizes, salt, say):
    """W6: W1 with metrics on (read once a second) and off, in turns."""
    runs = {True: [], False: []}
    cpu = {True: [], False: []}         # server CPU s per 1,000 writes
    pages = []
    for number in range(sizes['w6_rounds']):
        for metrics in ((True, False) if number % 2 == 0 else (False, True)):
            say('tcplog: W6 round %d, metrics %s'
                % (number + 1, 'on' if metrics else 'off'))
            port = free_port()
            server = LogServer(folder, options=('--metrics-port', str(port))
                               if metrics else ())
            stop = threading.Event()

            def scrape(port=port, stop=stop):
                while True:                 # at once, then once a second
                    started = time.perf_counter()
                    # The listener may not be up yet when the server is.
                    with connect(port) as sock:
                        sock.sendall(b'GET /metrics HTTP/1.0\r\n\r\n')
                        while sock.recv(1 << 16):
                            pass
                    pages.append(time.perf_counter() - started)
                    if stop.wait(1.0):
                        return
            scraper = threading.Thread(target=scrape, daemon=True)
            try:
                if metrics:
                    scraper.start()
                before = process_cpu(server.pid)
                runs[metrics].append(pipelined_writes(
                    server, entries_json(sizes['w6_w1'], '%s%d%s' % (
                        salt, number, metrics))))
                cpu[metrics].append((process_cpu(server.pid) - before)
                                    * 1000 / sizes['w6_w1'])
            finally:
                stop.set()
                if metrics:
                    scraper.join()
                server.stop()
    on, off = max(runs[True]), max(runs[False])
    return {'on': on, 'off': off, 'ratio': on / off,
            'cpu_on': min(cpu[True]), 'cpu_off': min(cpu[False]),
            'cpu_ratio': min(cpu[True]) / min(cpu[False]),
            'rounds': {'on': runs[True], 'off': runs[False]},
            'page_ms': 1000 * statistics.median(pages) if pages else None}


# The entries a server keeps in memory for readers, at most: W7's warm-up
# fills that, so that what grows after it is the ids.
RECENT_ENTRIES = 1 << 16


def unique_ids():
    """Ids never seen before in any log: a random prefix and a counter."""
    prefix = os.urandom(8).hex().encode()
    return (b'%s-%d' % (prefix, n) for n in itertools.count())


def counted_writes(server, datas, ids=None, marked=True):
    """pipelined_writes with its replies checked: writes/s, or an error
    if a write was refused or answered as a duplicate (stored nothing)."""
    received = []
    rate = pipelined_writes(server, datas, received=received, ids=ids,
                            marked=marked)
    replies = b''.join(data for _, data in received)
    for what in (b'"duplicate":true', b'"error":'):
        if what in replies:
            raise RuntimeError('%d of %d writes answered %s'
                               % (replies.count(what), len(datas),
                                  what.decode()))
    return rate


def idempotent(folder, sizes, salt, say):
    """W7: W1 with idempotent writes, plain W1, and plain W1 under ids as
    long as the idempotent writes', in turns on one server; then the
    memory the ids of a default window take."""
    ids = unique_ids()
    # What each kind of run sends: (ids, marked idempotent).
    kinds = {'idempotent': (ids, True), 'plain': (None, True),
             'long_ids': (ids, False)}
    runs = {kind: [] for kind in kinds}
    server = LogServer(os.path.join(folder, 'turns'))
    try:
        # A server that ignores the flag would make this W1 against W1.
        with connect(server.port) as sock:
            sock.sendall(2 * LogProtocol.write_idempotent(
                next(ids), b'{"w7":true}'))
            replies = b''
            while replies.count(b'\n') < 2:
                replies += sock.recv(1 << 16)
        if b'"duplicate":true' not in replies.splitlines()[1]:
            raise RuntimeError('W7: the server does not take idempotent '
                               'writes: %r' % replies)
        # A new server's first run is often the slowest, whichever it is:
        # one of each, unmeasured, first.
        say('tcplog: W7 a run of each, unmeasured')
        for kind, (their_ids, marked) in kinds.items():
            counted_writes(server, entries_json(sizes['w7_w1'], '%swarm%s' % (
                salt, kind)), ids=their_ids, marked=marked)
        order = list(kinds)
        for number in range(sizes['w7_rounds']):
            # Each kind goes first, second and last in turn.
            for kind in order[number % 3:] + order[:number % 3]:
                say('tcplog: W7 round %d, %s' % (number + 1, kind))
                their_ids, marked = kinds[kind]
                runs[kind].append(counted_writes(
                    server, entries_json(sizes['w7_w1'], '%s%d%s' % (
                        salt, number, kind)), ids=their_ids, marked=marked))
    finally:
        server.stop()
    done_with(folder, 'turns')
    flagged, plain, long_ids = (statistics.median(runs[kind])
                                for kind in kinds)
    results = {'idempotent': flagged, 'plain': plain, 'long_ids': long_ids,
               'ratio': flagged / plain, 'ratio_long_ids': flagged / long_ids,
               'entries_per_run': sizes['w7_w1'], 'rounds': runs}
    # The same writes, with the same ids, to a server that keeps them and
    # to one that keeps none.
    count = sizes['w7_ids']
    warm_up = entries_json(RECENT_ENTRIES, 'warm' + salt)
    datas = entries_json(count, 'ids' + salt)
    keys = list(itertools.islice(ids, count))
    memory = {}
    for name, window in (('kept', count), ('none', 0)):
        say('tcplog: W7 memory, --idempotence-window %d' % window)
        server = LogServer(os.path.join(folder, name),
                           options=('--idempotence-window', str(window)))
        try:
            threads = process_memory(server.pid)[1]
            counted_writes(server, warm_up)
            server_threads_down_to(server, threads)
            before = process_memory(server.pid)[0]
            counted_writes(server, datas, ids=iter(keys))
            server_threads_down_to(server, threads)
            after = process_memory(server.pid)[0]
        finally:
            server.stop()
        done_with(folder, name)
        memory[name] = {'before_mib': before / 1024, 'after_mib': after / 1024,
                        'added_mib': (after - before) / 1024}
    added = memory['kept']['added_mib'] - memory['none']['added_mib']
    memory.update({'ids': count, 'warm_up': RECENT_ENTRIES,
                   'added_mib': added,
                   'bytes_per_id': added * (1 << 20) / count})
    results['memory'] = memory
    return results


def python_clients(server, count, rounds, salt):
    """A1: append_many and a catch-up read through Client and through
    AsyncClient, in turns: their rates, and the ratios."""
    rates = {kind: {'append_many': [], 'read': []}
             for kind in ('client', 'async')}
    for number in range(rounds):
        kinds = ('client', 'async') if number % 2 == 0 else ('async',
                                                            'client')
        for kind in kinds:
            entries = [entry(n, '%s-%s-%d' % (salt, kind, number))
                       for n in range(count)]
            measure = threaded_client if kind == 'client' else \
                lambda *args: asyncio.run(async_client(*args))
            append_rate, read_rate = measure(server.port, entries)
            rates[kind]['append_many'].append(append_rate)
            rates[kind]['read'].append(read_rate)
    results = {kind: {'append_many': max(each['append_many']),
                      'read': max(each['read']), 'rounds': each}
               for kind, each in rates.items()}
    results['ratio'] = {
        what: results['async'][what] / results['client'][what]
        for what in ('append_many', 'read')}
    results['median_ratio'] = {
        what: statistics.median(rates['async'][what])
        / statistics.median(rates['client'][what])
        for what in ('append_many', 'read')}
    results['entries'], results['rounds'] = count, rounds
    return results


def threaded_client(port, entries):
    """(append_many writes/s, catch-up read entries/s) through Client: the
    read is of the entries just appended, which the server has in memory
    (as it has the latest 65,536)."""
    with tcplogserver.Client('127.0.0.1', port, timeout=60) as client:
        started = time.perf_counter()
        first = client.append_many(entries)[0]
        appended = time.perf_counter() - started
        started = time.perf_counter()
        with client.read(first, follow=False) as reader:
            read = sum(1 for _ in itertools.islice(reader, len(entries)))
        elapsed = time.perf_counter() - started
    return len(entries) / appended, read / elapsed


async def async_client(port, entries):
    """(append_many writes/s, catch-up read entries/s) through
    AsyncClient."""
    async with tcplogserver.AsyncClient('127.0.0.1', port,
                                        timeout=60) as client:
        started = time.perf_counter()
        first = (await client.append_many(entries))[0]
        appended = time.perf_counter() - started
        started = time.perf_counter()
        read = 0
        async with client.read(first, follow=False) as reader:
            async for _ in reader:
                read += 1
                if read == len(entries):
                    break
        elapsed = time.perf_counter() - started
    return len(entries) / appended, read / elapsed


def start_up(folder, entries):
    """A log of entries lines: seconds from start until a read answers."""
    os.makedirs(os.path.join(folder, 'blobs'))
    names = []
    for n in range(1000):
        data = tcplogserver.canonical_json(entry(n, 'start-up'))
        name = tcplogserver.sha256_hex(data)
        with open(os.path.join(folder, 'blobs', name), 'wb') as blob:
            blob.write(data)
        names.append(name.encode() + b'\n')
    with open(os.path.join(folder, 'log'), 'wb') as log:
        log.writelines(names[n % 1000] for n in range(entries))
    os.sync()           # a server starts on data that is on the disk
    # As installed, the module is compiled once, not at every start.
    env = {k: v for k, v in os.environ.items()
           if k != 'PYTHONDONTWRITEBYTECODE'}
    env['PYTHONPATH'] = ROOT
    subprocess.run([sys.executable, '-c', 'import tcplogserver'], env=env,
                   cwd=ROOT, check=True)
    # The median of three starts: one start is at the mercy of the machine.
    return statistics.median(
        start_once(folder, entries, env) for _ in range(3))


def start_once(folder, entries, env):
    port = free_port()
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, '-m', 'tcplogserver', '--port', str(port),
         '--file', os.path.join(folder, 'log'),
         '--blobs', os.path.join(folder, 'blobs'), '--log-level', 'warn'],
        env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    try:
        sock = connect(port)
        sock.sendall(b'{"from":%d,"read":1}\n' % entries)
        answer = b''
        while b'\n' not in answer:
            answer += sock.recv(1 << 16)
        elapsed = time.perf_counter() - started
        sock.close()
        assert answer.startswith(b'{"index":%d,"entry"' % entries), answer
    finally:
        process.terminate()
        process.wait()
    return elapsed


def python_start():
    """Seconds the interpreter takes to start and stop, doing nothing."""
    started = time.perf_counter()
    subprocess.run([sys.executable, '-c', 'pass'], check=True)
    return time.perf_counter() - started


def _libc_syncfs():
    try:
        function = ctypes.CDLL(None, use_errno=True).syncfs
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int]
    return function


_syncfs = _libc_syncfs()


def flush_filesystem(fd):
    """What the server calls to flush new blobs: Linux's syncfs, one call
    for the whole filesystem (os.sync where there is none).  The bench's
    own, so that it does not depend on the module's private names."""
    if _syncfs is None:
        os.sync()
    elif _syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def ceiling(folder, datas, sequence='new', batch=1000):
    """Entries/s for a write's own work, with no network, as the server
    does it, flushing every batch entries: with the server's sequence
    ('new': each blob made under its name, FILE.commit naming the batch,
    one flush of the file system for blobs and lines, FILE.commit
    naming none) or the one before it ('old': each blob under a temporary
    name, a flush of the file system, the renames, a flush of the folder,
    the lines, a flush of FILE).  With batch 1 this is the floor of W2,
    where each commit holds one write."""
    blobs = os.path.join(folder, 'blobs')
    os.makedirs(blobs, exist_ok=True)
    directory = os.open(blobs, os.O_RDONLY)
    log = os.open(os.path.join(folder, 'ceiling-%s.log' % sequence),
                  os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    commit = os.open(os.path.join(folder, 'ceiling-%s.log.commit'
                                  % sequence),
                     os.O_WRONLY | os.O_CREAT, 0o600)
    messages = [LogProtocol.write(n, data) for n, data in enumerate(datas)]
    started = time.perf_counter()
    for start in range(0, len(messages), batch):
        lines, renames = [], []
        for message in messages[start:start + batch]:
            value = tcplogserver.parse_json(message)
            data = tcplogserver.canonical_json(value['entry'])
            name = tcplogserver.sha256_hex(data)
            if sequence == 'new':
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o600, dir_fd=directory)
            else:
                temporary = '.%s.tmp' % name
                fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                             0o600, dir_fd=directory)
                renames.append((temporary, name))
            os.write(fd, data)
            os.close(fd)
            lines.append(name.encode() + b'\n')
        if sequence == 'new':
            last = start + len(lines) - 1
            os.pwrite(commit, b'%020d %020d\n' % (start, last), 0)
            os.write(log, b''.join(lines))
            flush_filesystem(log)
            os.pwrite(commit, b'%020d %020d\n' % (last + 1, last), 0)
            continue
        flush_filesystem(directory)
        for temporary, name in renames:
            os.rename(temporary, name, src_dir_fd=directory,
                      dst_dir_fd=directory)
        os.fsync(directory)
        os.write(log, b''.join(lines))
        os.fdatasync(log)
    elapsed = time.perf_counter() - started
    for fd in (directory, log, commit):
        os.close(fd)
    return len(messages) / elapsed


def ceilings_of(folder, count, salt, sequences, batch=1000, into=None):
    """The ceiling of each of sequences, in that order, each on count
    entries of its own, added to the lists of into: into, or a new
    {sequence: [entries/s]}."""
    into = {sequence: [] for sequence in sequences} if into is None \
        else into
    for sequence in sequences:
        into[sequence].append(ceiling(
            folder, entries_json(count, salt + sequence), sequence, batch))
    return into


# ----------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------

SCENARIOS = ('W1', 'W2', 'W3', 'W4', 'W5', 'W6', 'W7', 'R1', 'F1', 'C1',
             'F2', 'L1', 'S1', 'A1')

SIZES = {
    'quick': {'w1': 10000, 'w2': 300, 'w3': 10000, 'w4_pairs': 4,
              'w5_w1': 5000, 'w5_w2': 200, 'w5_rounds': 2,
              'w6_w1': 5000, 'w6_rounds': 4,
              'w7_w1': 10000, 'w7_rounds': 4, 'w7_ids': 100000,
              'f1_seconds': 2, 'c1': 500, 's1': 200000, 'f2': 10000,
              'l1_seconds': 2, 'compare_rounds': 4, 'compare_slices': 4,
              'a1': 10000, 'a1_rounds': 5},
    'full': {'w1': 50000, 'w2': 2000, 'w3': 50000, 'w4_pairs': 4,
             'w5_w1': 20000, 'w5_w2': 1000, 'w5_rounds': 3,
             'w6_w1': 20000, 'w6_rounds': 6,
             'w7_w1': 50000, 'w7_rounds': 6, 'w7_ids': 100000,
             'f1_seconds': 5, 'c1': 2000, 's1': 1000000, 'f2': 100000,
             'l1_seconds': 10, 'compare_rounds': 6, 'compare_slices': 10,
             'a1': 50000, 'a1_rounds': 6},
}


def run(folder, size, say, only=SCENARIOS):
    results = {'machine': {
        'cpus': os.cpu_count(), 'python': sys.version.split()[0],
        'folder': folder, 'size': size, 'scenarios': list(only)}}
    sizes = SIZES[size]
    salt = str(time.time_ns())
    # Thousands of connections need as many descriptors, here and in the
    # servers (which inherit the limit).
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    if 'W1' in only:
        say('null server: the harness\'s limit')
        null = NullServer()
        try:
            results['null'] = {'w1': pipelined_writes(
                null, entries_json(sizes['w1'], salt))}
        finally:
            null.stop()

    # The scenarios run on a tcplogserver and on a Redis server, in turn.
    served = [name for name in ('W1', 'W2', 'W3', 'R1', 'W4', 'F1', 'C1')
              if name in only]
    kinds = []
    if served:
        # C1's idle connections, and more, within the server's limit.
        kinds.append(('tcplog', lambda: LogServer(
            os.path.join(folder, 'tcplog'),
            options=('--max-connections', str(sizes['c1'] + 1000),
                     '--max-connections-per-client',
                     str(sizes['c1'] + 1000)))))
    if served and served != ['W4']:
        if shutil.which('redis-server'):
            kinds.append(('redis', lambda: RedisServer(
                os.path.join(folder, 'redis'))))
        else:
            say('redis-server not found (apt-get install redis-server): '
                'no Redis column')
    for kind, start in kinds:
        server = start()
        mine = results[kind] = {}
        written = 0
        try:
            if 'W1' in only:
                if kind == 'tcplog':
                    say('ceiling, before W1')
                    ceilings = ceilings_of(os.path.join(folder, 'tcplog'),
                                           sizes['w1'] // 2, 'c1' + salt,
                                           ('old', 'new'))
                say('%s: W1 pipelined writes' % kind)
                cpu = process_cpu(server.pid)
                mine['w1'] = pipelined_writes(
                    server, entries_json(sizes['w1'], 'w1' + salt))
                mine['cpu_s_per_1000_writes'] = (
                    (process_cpu(server.pid) - cpu) * 1000 / sizes['w1'])
                written += sizes['w1']
                if kind == 'tcplog':
                    # The disk's speed wanders: the ceiling is taken just
                    # before and just after W1, in the server's own blob
                    # folder.
                    say('ceiling, after W1')
                    ceilings_of(os.path.join(folder, 'tcplog'),
                                sizes['w1'] // 2, 'c2' + salt,
                                ('new', 'old'), into=ceilings)
                    results['ceiling'] = sum(ceilings['new']) / 2
                    results['ceilings'] = ceilings['new']
                    results['ceiling_old'] = sum(ceilings['old']) / 2
                    results['ceilings_old'] = ceilings['old']
            if 'W2' in only:
                if kind == 'tcplog':
                    # As the ceiling is, just before and just after.
                    say('floor (the ceiling one write at a time), before W2')
                    floors = ceilings_of(os.path.join(folder, 'tcplog'),
                                         sizes['w2'] // 2, 'f1' + salt,
                                         ('old', 'new'), batch=1)
                say('%s: W2 request-response writes' % kind)
                rate, p50, p99 = request_response(
                    server, entries_json(sizes['w2'], 'w2' + salt))
                mine['w2'] = {'rate': rate, 'p50_ms': p50, 'p99_ms': p99}
                written += sizes['w2']
                if kind == 'tcplog':
                    say('floor, after W2')
                    ceilings_of(os.path.join(folder, 'tcplog'),
                                sizes['w2'] // 2, 'f2' + salt,
                                ('new', 'old'), batch=1, into=floors)
                    results['floors'] = floors['new']
                    results['floors_old'] = floors['old']
            if 'W3' in only:
                say('%s: W3 16 connections' % kind)
                flushes = server.flushes() if kind == 'tcplog' else 0
                mine['w3'] = {'rate': pipelined_writes(
                    server, entries_json(sizes['w3'], 'w3' + salt),
                    connections=16)}
                written += sizes['w3']
                if kind == 'tcplog':
                    after = server.flushes()
                    mine['w3']['flushes_per_write'] = (
                        None if after is None
                        else (after - flushes) / sizes['w3'])
                    if after is None:
                        say('flushes not counted: the server has no %s'
                            % ', '.join(server.uncounted))
            if 'R1' in only:
                if not written:
                    say('%s: W1\'s writes, unmeasured, for R1 to read' % kind)
                    pipelined_writes(server, entries_json(sizes['w1'],
                                                          'w1' + salt))
                    written = sizes['w1']
                say('%s: R1 catch-up read' % kind)
                mine['r1'] = catch_up_read(server, written)
            if 'W4' in only and kind == 'tcplog':
                # After R1, which reads the log as W1 to W3 left it.
                say('tcplog: W4 W1 with a reader that never reads, and '
                    'without, in turns')
                mine['w4'] = stalled_reader(server, sizes['w1'] // 2,
                                            sizes['w4_pairs'], 'w4' + salt)
            if 'F1' in only:
                say('%s: F1 fan-out' % kind)
                mine['f1'] = fan_out(server, 100, 1000, sizes['f1_seconds'])
                say('%s: F1 fan-out, 500 readers' % kind)
                mine['f1_500'] = fan_out(server, 500, 1000,
                                         sizes['f1_seconds'])
            if 'C1' in only:
                say('%s: C1 idle connections' % kind)
                mine['c1'] = idle_connections(server, sizes['c1'])
        finally:
            server.stop()
            done_with(folder, kind)
    if 'W5' in only:
        results.setdefault('tcplog', {})['w5'] = sync_replication(
            os.path.join(folder, 'sync'), sizes, 'w5' + salt, say)
        done_with(folder, 'sync')
    if 'W6' in only:
        results.setdefault('tcplog', {})['w6'] = monitored(
            os.path.join(folder, 'monitored'), sizes, 'w6' + salt, say)
        done_with(folder, 'monitored')
    if 'W7' in only:
        results.setdefault('tcplog', {})['w7'] = idempotent(
            os.path.join(folder, 'idempotent'), sizes, 'w7' + salt, say)
        done_with(folder, 'idempotent')
    if 'F2' in only or 'L1' in only:
        # L1 runs on F2's primary and follower, once it has caught up.
        results.setdefault('tcplog', {}).update(follow(
            os.path.join(folder, 'follow'), sizes, 'f2' + salt,
            'L1' in only, say))
        done_with(folder, 'follow')
    if 'S1' in only:
        say('tcplog: S1 start-up on %d entries' % sizes['s1'])
        results.setdefault('tcplog', {})['s1_ms'] = 1000 * start_up(
            os.path.join(folder, 'start-up'), sizes['s1'])
        results['python_start_ms'] = 1000 * statistics.median(
            python_start() for _ in range(3))
        done_with(folder, 'start-up')
    if 'A1' in only:
        say('tcplog: A1 append_many and a catch-up read through Client and '
            'AsyncClient, in turns')
        server = LogServer(os.path.join(folder, 'clients'))
        try:
            results.setdefault('tcplog', {})['a1'] = python_clients(
                server, sizes['a1'], sizes['a1_rounds'], 'a1' + salt)
        finally:
            server.stop()
    return results


def done_with(folder, name):
    """Remove a scenario's files once it is over: a full run makes over a
    million blob files, which use up a tmpfs's inodes (a file each) before
    its bytes."""
    shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


# What --compare measures: (name, path in a round's results, whether more
# is better).
COMPARED = [
    ('W1 pipelined writes/s', ('w1',), True),
    ('W1 server CPU s per 1,000 writes', ('cpu_s_per_1000_writes',), False),
    ('R1 catch-up read, entries/s', ('r1',), True),
    ('R1 after a restart, entries/s', ('r1_restarted',), True),
    ('W2 request-response writes/s', ('w2', 'rate'), True),
    ('W2 p50 ms', ('w2', 'p50_ms'), False),
    ('W2 flushes per write', ('w2', 'flushes_per_write'), False),
    ('F1 fan-out p50 ms', ('f1', 'p50_ms'), False),
    ('F1 fan-out p99 ms', ('f1', 'p99_ms'), False),
    ('F1 fan-out max ms', ('f1', 'max_ms'), False),
]

# The rates of a scenario compare runs in slices, and where each round
# keeps them: a slice of new and the same slice of old run one after the
# other, so that the pair sees the same disk.
SLICED = {('w1',): ('w1_slices',), ('w2', 'rate'): ('w2', 'rate_slices')}


def in_slices(datas, slices, order):
    """(name, part) for each of slices parts of datas, for each name in
    order, the name first in a pair changing from slice to slice.  On
    this kind of disk, the cost of making a file changes twentyfold from
    one second to the next; a pair run back to back sees nearly the same
    disk, so the ratio within a pair is the steadier one."""
    size = len(datas) // slices
    for number in range(slices):
        part = datas[number * size:(number + 1) * size]
        for name in (order if number % 2 == 0 else order[::-1]):
            yield name, part


def compare(folder, size, other, say):
    """W1, R1 and F1 on the module beside this folder ('new') and on the
    tcplogserver.py at other ('old'), in turns: each round starts a server
    of each on new files in folder, and runs each scenario on one then on
    the other, the first one changing from round to round."""
    sizes = SIZES[size]
    modules = {'new': MODULE, 'old': os.path.abspath(other)}
    rounds = sizes['compare_rounds']
    slices = sizes['compare_slices']

    def sliced(datas):
        """How many of datas the slices hold."""
        return len(datas) // slices * slices
    runs = {'new': [], 'old': []}
    found = {}
    for number in range(rounds):
        order = ('new', 'old') if number % 2 == 0 else ('old', 'new')
        # The same entries for both: they are content-addressed.
        datas = entries_json(sizes['w1'], 'compare%d-%d'
                             % (number, time.time_ns()))
        servers, mine = {}, {name: {} for name in order}
        try:
            for name in order:
                servers[name] = LogServer(
                    os.path.join(folder, 'compare-' + name),
                    module=modules[name])
                found[name] = {'module': servers[name].module['file'],
                               'version': servers[name].module['version']}
            say('compare, round %d of %d: W1, %s first, in %d slices'
                % (number + 1, rounds, order[0], slices))
            cpu = {name: process_cpu(servers[name].pid) for name in order}
            rates = {name: [] for name in order}
            for name, part in in_slices(datas, slices, order):
                rates[name].append(pipelined_writes(servers[name], part))
            for name in order:
                # The slices are of one size: the rate of all of them is
                # the harmonic mean of theirs.
                mine[name]['w1'] = statistics.harmonic_mean(rates[name])
                mine[name]['w1_slices'] = rates[name]
                mine[name]['cpu_s_per_1000_writes'] = (
                    (process_cpu(servers[name].pid) - cpu[name]) * 1000
                    / sliced(datas))
            say('compare, round %d of %d: W2, in %d slices'
                % (number + 1, rounds, slices))
            w2_datas = entries_json(sizes['w2'], 'compare-w2-%d-%d'
                                    % (number, time.time_ns()))
            flushes = {name: servers[name].flushes() for name in order}
            latencies = {name: [] for name in order}
            rates = {name: [] for name in order}
            for name, part in in_slices(w2_datas, slices, order):
                rates[name].append(request_response(
                    servers[name], part, latencies[name])[0])
            for name in order:
                mine[name]['w2'] = {
                    'rate': statistics.harmonic_mean(rates[name]),
                    'rate_slices': rates[name],
                    'p50_ms': 1000 * percentile(latencies[name], 0.5),
                    'flushes_per_write': (servers[name].flushes()
                                          - flushes[name])
                    / sliced(w2_datas)}
            say('compare, round %d of %d: R1, then R1 after a restart'
                % (number + 1, rounds))
            for name in order:
                # A read of the W1 log takes milliseconds: the best of 5.
                mine[name]['r1'] = max(catch_up_read(servers[name],
                                                     len(datas))
                                       for _ in range(5))
            for name in order:
                # A server keeps the latest entries in memory, and serves
                # older ones from the files: just started, it has none.
                servers.pop(name).stop()
                servers[name] = LogServer(
                    os.path.join(folder, 'compare-' + name),
                    module=modules[name])
            for name in order:
                mine[name]['r1_restarted'] = max(
                    catch_up_read(servers[name], len(datas))
                    for _ in range(5))
            say('compare, round %d of %d: F1' % (number + 1, rounds))
            for name in order:
                mine[name]['f1'] = fan_out(servers[name], 100, 1000,
                                           sizes['f1_seconds'])
        finally:
            for server in servers.values():
                server.stop()
            for name in order:
                shutil.rmtree(os.path.join(folder, 'compare-' + name),
                              ignore_errors=True)
        for name in order:
            runs[name].append(mine[name])

    def value(run, path):
        for key in path:
            run = run[key]
        return run
    summary = {}
    for label, path, more_is_better in COMPARED:
        key = '.'.join(path)
        new = [value(run, path) for run in runs['new']]
        old = [value(run, path) for run in runs['old']]
        best = max if more_is_better else min
        summary[key] = {
            'more_is_better': more_is_better,
            'new_best': best(new), 'old_best': best(old),
            'new_median': statistics.median(new),
            'old_median': statistics.median(old),
            'ratio_best': ratio(best(new), best(old)),
            'ratio_median': ratio(statistics.median(new),
                                  statistics.median(old)),
            'round_ratios': [ratio(n, o) for n, o in zip(new, old)]}
        if path in SLICED:
            pairs = [ratio(n, o)
                     for new_run, old_run in zip(runs['new'], runs['old'])
                     for n, o in zip(value(new_run, SLICED[path]),
                                     value(old_run, SLICED[path]))]
            summary[key]['ratio_paired'] = statistics.median(pairs)
            summary[key]['pairs'] = len(pairs)
    for name in ('new', 'old'):
        found[name]['f1_missing'] = sum(run['f1']['missing']
                                        for run in runs[name])
        found[name]['f1_duplicate'] = sum(run['f1']['duplicate']
                                          for run in runs[name])
    return {'rounds': rounds, 'new': found['new'], 'old': found['old'],
            'summary': summary, 'runs': runs}


def ratio(mine, theirs):
    return mine / theirs if theirs else None


def compare_table(compared):
    new, old = compared['new'], compared['old']
    lines = ['compare: new = %s (%s), old = %s (%s); %d rounds, in turns'
             % (new['module'], new['version'], old['module'], old['version'],
                compared['rounds']),
             '%-36s %12s %12s %8s %8s %14s %7s' % (
                 '', 'new', 'old', 'new/old', 'median', 'rounds',
                 'paired')]
    for label, path, _ in COMPARED:
        figures = compared['summary']['.'.join(path)]
        digits = 0 if figures['more_is_better'] else 2
        if path == ('cpu_s_per_1000_writes',):
            digits = 4
        rounds = figures['round_ratios']
        lines.append('%-36s %12s %12s %8s %8s %14s %7s' % (
            label, '{:,.{}f}'.format(figures['new_best'], digits),
            '{:,.{}f}'.format(figures['old_best'], digits),
            '%.2f' % figures['ratio_best'] if figures['ratio_best'] else '-',
            '%.2f' % figures['ratio_median']
            if figures['ratio_median'] else '-',
            '%.2f to %.2f' % (min(rounds), max(rounds))
            if None not in rounds else '-',
            '%.2f' % figures['ratio_paired']
            if figures.get('ratio_paired') else ''))
    lines.append('%-36s %12s %12s' % (
        'F1 missing / duplicate, all rounds',
        '%d / %d' % (new['f1_missing'], new['f1_duplicate']),
        '%d / %d' % (old['f1_missing'], old['f1_duplicate'])))
    lines.append('')
    lines.append('new and old: the best round of each (the highest rate, '
                 'the lowest time or cost).')
    lines.append('new/old: of those; median: of the medians; rounds: the '
                 'lowest and highest')
    lines.append('new/old within one round; paired: the median new/old of '
                 'the slices of a')
    lines.append('round run back to back (%d pairs), the steadiest on a disk '
                 'whose speed'
                 % max(figures.get('pairs', 0)
                       for figures in compared['summary'].values()))
    lines.append('changes from second to second.  Above 1, a rate is faster '
                 'in new, and a time')
    lines.append('or a cost is more in new.')
    return '\n'.join(lines)


def table(results):
    tcplog, redis = results.get('tcplog', {}), results.get('redis', {})

    def get(data, *path):
        for key in path:
            if not isinstance(data, dict) or key not in data:
                return None
            data = data[key]
        return data

    def number(value, digits=0):
        if value is None:
            return '-'
        if isinstance(value, bool):
            return 'yes' if value else 'no'
        return '{:,.{}f}'.format(value, digits)
    rows = [
        ('W1 pipelined writes/s', ('w1',), 0),
        ('W1 server CPU s per 1,000 writes', ('cpu_s_per_1000_writes',), 3),
        ('W2 request-response writes/s', ('w2', 'rate'), 0),
        ('W2 p50 ms', ('w2', 'p50_ms'), 2),
        ('W2 p99 ms', ('w2', 'p99_ms'), 2),
        ('W3 16 connections, writes/s', ('w3', 'rate'), 0),
        ('W3 flushes per write', ('w3', 'flushes_per_write'), 4),
        ('W4 with a stalled reader, writes/s', ('w4', 'with'), 0),
        ('W4 without it (same turns), writes/s', ('w4', 'without'), 0),
        ('W4 with / without', ('w4', 'ratio'), 2),
        ('W6 W1 metrics on, writes/s', ('w6', 'on'), 0),
        ('W6 W1 metrics off, writes/s', ('w6', 'off'), 0),
        ('W6 on / off', ('w6', 'ratio'), 2),
        ('W6 server CPU s per 1,000, on', ('w6', 'cpu_on'), 4),
        ('W6 server CPU s per 1,000, off', ('w6', 'cpu_off'), 4),
        ('W6 CPU on / off', ('w6', 'cpu_ratio'), 2),
        ('W6 a /metrics page, ms', ('w6', 'page_ms'), 2),
        ('W7 W1 idempotent, writes/s', ('w7', 'idempotent'), 0),
        ('W7 W1 plain (same turns), writes/s', ('w7', 'plain'), 0),
        ('W7 W1 plain, ids as long, writes/s', ('w7', 'long_ids'), 0),
        ('W7 idempotent / plain', ('w7', 'ratio'), 2),
        ('W7 idempotent / plain, ids as long', ('w7', 'ratio_long_ids'), 2),
        ('W7 RSS MiB, 100,000 ids kept', ('w7', 'memory', 'kept',
                                          'after_mib'), 1),
        ('W7 RSS MiB, none kept (window 0)', ('w7', 'memory', 'none',
                                              'after_mib'), 1),
        ('W7 RSS MiB the ids added', ('w7', 'memory', 'added_mib'), 1),
        ('W7 bytes per id', ('w7', 'memory', 'bytes_per_id'), 0),
        ('W5 W1 sync follower, writes/s', ('w5', 'sync', 'w1'), 0),
        ('W5 W1 async follower, writes/s', ('w5', 'async', 'w1'), 0),
        ('W5 W1 sync / async', ('w5', 'w1_ratio'), 2),
        ('W5 W2 sync follower, writes/s', ('w5', 'sync', 'w2'), 0),
        ('W5 W2 async follower, writes/s', ('w5', 'async', 'w2'), 0),
        ('W5 W2 sync / async', ('w5', 'w2_ratio'), 2),
        ('W5 W2 p50 ms sync / async', ('w5',), None),
        ('W5 W2 p50 added by sync, ms', ('w5', 'w2_added_p50_ms'), 2),
        ('W5 the follower\'s own W2 p50 ms', ('w5', 'follower_w2_p50_ms'),
         2),
        ('R1 catch-up read, entries/s', ('r1',), 0),
        ('F1 fan-out p50 ms', ('f1', 'p50_ms'), 2),
        ('F1 fan-out p99 ms', ('f1', 'p99_ms'), 2),
        ('F1 fan-out max ms', ('f1', 'max_ms'), 2),
        ('F1 missing / duplicate', ('f1',), None),
        ('F1 CPU s/s, server / readers', ('f1',), None),
        ('F1 500 readers p50 ms', ('f1_500', 'p50_ms'), 2),
        ('F1 500 readers p99 ms', ('f1_500', 'p99_ms'), 2),
        ('F1 500 readers max ms', ('f1_500', 'max_ms'), 2),
        ('F1 500 missing / duplicate', ('f1_500',), None),
        ('F1 500 CPU s/s, server / readers', ('f1_500',), None),
        ('C1 RSS KiB per idle connection', ('c1', 'kib_per_connection'), 1),
        ('C1 threads before / with', ('c1',), None),
        ('C1 write served with them', ('c1', 'write_served'), 0),
        ('F2 follower catch-up, entries/s', ('f2', 'rate'), 0),
        ('F2 W1 of the same fill, writes/s', ('f2', 'w1'), 0),
        ('F2 catch-up / W1', ('f2', 'ratio'), 2),
        ('L1 follower lag p50 ms', ('l1', 'p50_ms'), 2),
        ('L1 follower lag p99 ms', ('l1', 'p99_ms'), 2),
        ('L1 follower lag max ms', ('l1', 'max_ms'), 2),
        ('L1 p99 first / last third ms', ('l1',), None),
        ('L1 missing / duplicate', ('l1',), None),
        ('S1 start-up to first read, ms', ('s1_ms',), 0),
        ('A1 Client append_many, writes/s', ('a1', 'client', 'append_many'),
         0),
        ('A1 AsyncClient append_many, writes/s',
         ('a1', 'async', 'append_many'), 0),
        ('A1 append_many, async / threaded', ('a1', 'ratio', 'append_many'),
         2),
        ('A1 Client catch-up, entries/s', ('a1', 'client', 'read'), 0),
        ('A1 AsyncClient catch-up, entries/s', ('a1', 'async', 'read'), 0),
        ('A1 catch-up, async / threaded', ('a1', 'ratio', 'read'), 2),
    ]
    lines = ['%-36s %14s %14s %8s' % ('', 'tcplogserver', 'redis',
                                      'ratio')]
    for label, path, digits in rows:
        if get(tcplog, path[0]) is None and get(redis, path[0]) is None:
            continue            # a scenario not run (--only)
        if label.startswith('F1') and 'missing' in label:
            cells = ['%s / %s' % (get(d, path[0], 'missing'),
                                  get(d, path[0], 'duplicate'))
                     if get(d, path[0]) else '-' for d in (tcplog, redis)]
        elif label.startswith('F1') and 'CPU' in label:
            cells = ['%s / %s' % (number(get(d, path[0], 'server_cpu'), 2),
                                  number(get(d, path[0], 'readers_cpu'), 2))
                     if get(d, path[0]) else '-' for d in (tcplog, redis)]
        elif label.startswith('L1 p99 first'):
            cells = ['%s / %s' % (number(get(d, 'l1', 'p99_first_third_ms'),
                                         2),
                                  number(get(d, 'l1', 'p99_last_third_ms'),
                                         2))
                     if get(d, 'l1') else '-' for d in (tcplog, redis)]
        elif label.startswith('L1 missing'):
            cells = ['%s / %s' % (get(d, 'l1', 'missing'),
                                  get(d, 'l1', 'duplicate'))
                     if get(d, 'l1') else '-' for d in (tcplog, redis)]
        elif label.startswith('W5 W2 p50 ms'):
            cells = ['%s / %s' % (number(get(d, 'w5', 'sync', 'w2_p50_ms'),
                                         2),
                                  number(get(d, 'w5', 'async', 'w2_p50_ms'),
                                         2))
                     if get(d, 'w5') else '-' for d in (tcplog, redis)]
        elif label.startswith('C1 threads'):
            cells = ['%s / %s' % (get(d, 'c1', 'threads_before'),
                                  get(d, 'c1', 'threads_with'))
                     if get(d, 'c1') else '-' for d in (tcplog, redis)]
        else:
            cells = [number(get(d, *path), digits) for d in (tcplog, redis)]
        mine, theirs = get(tcplog, *path), get(redis, *path)
        ratio = ('%.2f' % (mine / theirs)
                 if digits is not None and isinstance(mine, (int, float))
                 and not isinstance(mine, bool) and theirs else '')
        lines.append('%-36s %14s %14s %8s' % (label, cells[0], cells[1],
                                              ratio))
    lines.append('')
    def baseline(label, scenario, rate, new, old):
        """A baseline taken of both write sequences just before and just
        after scenario (new and old: its two entries/s of each), beside
        the scenario's rate."""
        mean, mean_old = sum(new) / 2, sum(old) / 2
        lines.append('%s: %s/s (%s before %s, %s after); %s is %.0f%% of it'
                     % (label, number(mean), number(new[0]), scenario,
                        number(new[1]), scenario, 100 * rate / mean))
        lines.append('%s with the write sequence before: %s/s (%s before '
                     '%s, %s after); the new over it: %.2f'
                     % (label.split(' (')[0], number(mean_old),
                        number(old[0]), scenario, number(old[1]),
                        mean / mean_old))
    if 'w1' in tcplog:
        w1 = tcplog['w1']
        baseline('ceiling (a write\'s own work, no network)', 'W1', w1,
                 results['ceilings'], results['ceilings_old'])
        lines.append('null server (the harness\'s limit): %s/s; W1 is '
                     '%.0f%% of it' % (number(results['null']['w1']),
                                       100 * w1 / results['null']['w1']))
    if 'floors' in results:
        baseline('floor (the ceiling one write at a time, W2\'s own work)',
                 'W2', tcplog['w2']['rate'], results['floors'],
                 results['floors_old'])
    if 'w4' in tcplog:
        lines.append('W4: %s KiB waited for the stalled reader in the socket '
                     'buffers; runs of %s writes'
                     % (number(tcplog['w4']['held_kib']),
                        number(tcplog['w4']['entries_per_run'])))
    if 'w7' in tcplog:
        w7, memory = tcplog['w7'], tcplog['w7']['memory']
        lines.append('W7: %d rounds of %s writes of each, in turns; RSS after '
                     'a warm-up of %s plain writes: %s MiB (ids kept), %s MiB '
                     '(none kept); grown by %s and %s MiB with %s ids'
                     % (len(w7['rounds']['plain']),
                        number(w7['entries_per_run']),
                        number(memory['warm_up']),
                        number(memory['kept']['before_mib'], 1),
                        number(memory['none']['before_mib'], 1),
                        number(memory['kept']['added_mib'], 1),
                        number(memory['none']['added_mib'], 1),
                        number(memory['ids'])))
    if 'f2' in tcplog:
        f2 = tcplog['f2']
        lines.append('F2: %s entries; the follower had them %.2f s after it '
                     'started; it logged catching up after %s s, taking %s s '
                     'by its own count (%s entries/s)'
                     % (number(f2['entries']), f2['seconds'],
                        number(f2['logged_after_s'], 2),
                        number(f2['logged_seconds'], 2),
                        number(f2['logged_rate'])))
        lines.append('F2: server CPU s per 1,000 entries: %s copying them, %s '
                     'writing them (the fill); follower flushes per entry: %s'
                     % (number(f2['cpu_s_per_1000_entries'], 3),
                        number(f2['w1_cpu_s_per_1000_writes'], 3),
                        number(f2['flushes_per_entry'], 4)))
    if 'l1' in tcplog:
        l1 = tcplog['l1']
        lines.append('L1: %s writes in %.1f s (%s writes/s) while the '
                     'follower copied them; last third\'s p99 / first\'s: '
                     '%.2f' % (number(l1['writes']), l1['seconds'],
                               number(l1['rate']), l1['growth']))
        lines.append('L1 with the reader on the primary itself, no follower '
                     'between: p50 %.2f, p99 %.2f, max %.2f ms'
                     % (l1['primary']['p50_ms'], l1['primary']['p99_ms'],
                        l1['primary']['max_ms']))
    if 'a1' in tcplog:
        a1 = tcplog['a1']
        lines.append('A1: %s entries a round, %d rounds of each client in '
                     'turns; async / threaded of the medians: append_many '
                     '%.2f, read %.2f'
                     % (number(a1['entries']), a1['rounds'],
                        a1['median_ratio']['append_many'],
                        a1['median_ratio']['read']))
    if 's1_ms' in tcplog:
        lines.append('python3 -c pass (the interpreter\'s own start): %.0f '
                     'ms of S1\'s %.0f' % (results['python_start_ms'],
                                           tcplog['s1_ms']))
    return '\n'.join(lines)


def scenarios(text):
    """--only's names, in the order they run."""
    names = {name.strip().upper() for name in text.split(',')} - {''}
    unknown = names - set(SCENARIOS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            'not a scenario: %s (they are %s)'
            % (', '.join(sorted(unknown)) or repr(text),
               ', '.join(SCENARIOS)))
    return tuple(name for name in SCENARIOS if name in names)


def main():
    parser = argparse.ArgumentParser(
        description='Benchmark tcplogserver beside Redis Streams and its '
                    'limits.')
    parser.add_argument('--quick', action='store_true',
                        help='smaller runs: under a minute')
    parser.add_argument('--json', action='store_true',
                        help='print the results as JSON, not a table')
    parser.add_argument('--dir', help='where to keep the data (a temporary '
                                      'folder is made in it)')
    parser.add_argument('--compare', metavar='PATH',
                        help='also run W1, R1 and F1, in turns, on the '
                             'server beside this folder and on the '
                             'tcplogserver.py at PATH (an older version), '
                             'and print both and their ratios')
    parser.add_argument('--only', metavar='NAMES', type=scenarios,
                        default=SCENARIOS,
                        help='run only these scenarios, named with commas '
                             '(say W1,R1); all of them unless given')
    args = parser.parse_args()
    if args.compare and not os.path.isfile(args.compare):
        parser.error('--compare: %s is not a file' % args.compare)
    folder = os.path.abspath(tempfile.mkdtemp(prefix='tcplogserver-bench-',
                                              dir=args.dir))

    def say(text):
        print('bench: %s' % text, file=sys.stderr, flush=True)
    try:
        size = 'quick' if args.quick else 'full'
        results = run(folder, size, say, args.only)
        if args.compare:
            results['compare'] = compare(folder, size, args.compare, say)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(table(results))
        if args.compare:
            print()
            print(compare_table(results['compare']))


if __name__ == '__main__':
    main()
