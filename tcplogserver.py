"""Serve an append-only log over TCP.

tcplogserver speaks the protocol of the Node.js ``tcp-log-server`` byte for
byte and stores its data in the same layout, so existing clients and data
directories work unchanged.  Clients append JSON entries and get back their
index; readers stream entries from any index and are pushed new ones as they
are appended.  Unlike the original, an entry is acknowledged only once it is
on stable storage.

The file is one module, standard library only, and is cut into sections in
this order:

Canonical JSON
    ``parse_json`` reads a message as JavaScript's ``JSON.parse`` would;
    ``canonical_json`` writes an entry as ``fast-json-stable-stringify``
    would.  An entry's blob is its canonical bytes, named by their hash.
    An integer of more than 600 digits is a ``BigInt``.

Storage
    Knows entries only as canonical bytes, and indices; nothing of the
    wire.  A ``BlobStore`` keeps blobs by name: ``FileBlobs`` (one file per
    blob in a flat directory) or ``MemoryBlobs``.  ``Log`` owns the list of
    hashes (one line per entry), appends to it in group commits under a
    lock, with one flush a commit where ``_LastCommit`` (FILE.commit) lets
    recovery find a commit a crash cut short, reads entries back as bytes
    or a ``Problem``, and keeps the ``threading.Condition`` on which
    tailing readers wait.  ``_Ids`` keeps the keys of idempotent writes,
    so that an entry is stored once per key.  ``verify`` checks a log's
    files and gives a ``Report``.

Connections
    What the server and the client share: TLS contexts
    (``server_tls_context``, ``client_tls_context``), the ``_TLSSocket``
    that lets one thread receive while another sends, and the ways to end
    a connection.

Server
    Every message the server sends is encoded at the top of the section.
    ``Server`` is a ``socketserver.ThreadingTCPServer`` that uses its hooks:
    ``verify_request`` admits a connection or refuses one too many,
    ``finish_request`` makes the TLS handshake, ``server_close`` waits for
    the connections being served.  ``Handler``, its
    ``StreamRequestHandler``, serves one connection: a ``_LineSplitter``
    cuts its input into lines, and each read runs in a ``_Read`` thread of
    its own so that a connection can read and write at once; at the head
    of the log a read waits with the ``_Pusher``, the one thread that waits
    on the log's Condition for them all and sends each commit's entries,
    encoded once (``_EncodedLines``), to every read.  Followers
    report to ``_Replicas`` the entries they hold; with ``sync_replicas``,
    readers see only the entries enough of them hold, and a connection's
    ``_Acknowledger`` sends its replies once they do.

Logging
    ``PinoFormatter`` writes ``logging`` records as pino's JSON lines.

Client
    What a client knows of the protocol comes first, and does no I/O (bytes
    in; messages to send, and what replies mean, out): ``_Lines`` cuts what
    a server sends into lines, ``_Writes`` makes a connection's write
    messages (idempotent ones too, and ones sent again) and matches
    acknowledgements to them, ``_ReadState`` knows
    where a read stands (the next index, whether it is current, what to
    ask), and ``_ReconnectPolicy`` when to try a lost server again.
    ``Client`` drives it with threads: it appends entries (one at a time,
    or pipelined) over one shared connection, and sends again on a new
    one the writes a lost one left, where ids are kept; its ``read`` gives a
    ``Reader``, which yields entries, follows the log, and reconnects and
    resumes where it left off.

Asyncio client
    ``AsyncClient`` drives the same core with asyncio streams, for asyncio
    programs: the options, methods and semantics of ``Client``, as
    coroutines, but for sending writes again; its ``read`` gives an
    ``AsyncReader``, for ``async for``.  A cancelled append raises
    CancelledError in its own task only.

Following
    A ``Follower`` makes a log a copy of a primary's, with ordinary reads:
    each connection's ``_Copy`` first checks that the two logs share a
    history, then stores what the primary sends at the same indices
    (``Log.extend``), for ever or, for a backup, up to the primary's head.

Monitoring
    A ``Monitor`` turns what the log, the server and the follower count
    into Prometheus's text format, and says whether the server is ready;
    ``MetricsServer``, an ``http.server``, answers /metrics, /livez and
    /readyz with it.

Command line
    ``main`` runs the server (a follower, with FOLLOW), or a command:
    ``verify`` checks its files, ``append`` and ``tail`` use the client,
    ``backup`` copies a server's log.  Every setting is a row of
    ``_SETTINGS``, which parses and checks it.  ``python3 -m tcplogserver
    --help``.

Embedding, in short::

    log = Log('entries', FileBlobs('blobs'), logger=logger)
    log.append([canonical_json({'hello': 'world'})])    # [1]: the indices
    log.read(1, 1)                          # [(1, b'{"hello":"world"}')]
    with Server(('127.0.0.1', 8089), log, logger) as server:
        server.serve_forever()      # server.shutdown() from another thread
    log.close()
"""

import argparse
import binascii
import bisect
import collections
import concurrent.futures
import ctypes
import errno
import fcntl
import hashlib
import http.server
import io
import itertools
import json
import json.encoder
import logging
import math
import os
import random
import re
import resource
import select
import signal
import socket
import socketserver
import ssl
import sys
import threading
import time

__version__ = '0.1.0'
__all__ = [
    'DAMAGED_LINE', 'IDEMPOTENCE_WINDOW', 'KEY_SIZE', 'MAX_DEPTH', 'MEMORY',
    'MISSING_BLOB', 'TORN_LINE', 'UNREADABLE_BLOB', 'WRONG_BLOB',
    'AsyncClient', 'AsyncReader', 'BigInt', 'BlobStore', 'Client',
    'ClientError', 'ConnectionLost', 'Duplicate', 'FileBlobs',
    'Follower', 'Handler', 'Log', 'LogError', 'MemoryBlobs', 'MetricsServer',
    'Monitor', 'PinoFormatter',
    'Problem', 'ReadError', 'Reader', 'Report', 'Server', 'WriteError',
    'canonical_json', 'client_tls_context', 'main', 'parse_json',
    'server_tls_context', 'sha256_hex', 'verify',
]

# ============================================================================
# Canonical JSON
# ============================================================================

# An integer literal this long may exceed the interpreter's limit on
# int-from-text conversion (never below 640 digits), and converting it costs
# time quadratic in its length.  Such a literal is kept as its text.
_MAX_INT_DIGITS = 600


_INTEGER = re.compile('-?(?:0|[1-9][0-9]*)')


class BigInt:
    """An integer of more than 600 digits (a minus sign counts as one),
    kept as its decimal text.

    ``parse_json`` gives one in place of such an integer: converting it
    would cost time quadratic in its length, and Python refuses more than
    4,300 digits by default.  ``str()`` gives its digits and ``int()``
    converts it (within the interpreter's limit).  ``canonical_json`` and
    ``Client`` write it as the same number, so an entry read back appends
    back unchanged.
    """

    __slots__ = ('_digits',)

    def __init__(self, digits):
        if not _INTEGER.fullmatch(digits):
            raise ValueError('not an integer: %r' % (digits[:20],))
        self._digits = digits

    @property
    def digits(self):
        """The integer as text: its digits, after a minus sign if any."""
        return self._digits

    def __str__(self):
        return self.digits

    def __int__(self):
        return int(self.digits)

    def __repr__(self):
        return 'BigInt(%r)' % self.digits

    def __eq__(self, other):
        if type(other) is not BigInt:
            return NotImplemented
        return self.digits == other.digits

    def __hash__(self):
        return hash(self.digits)


# How deep objects and arrays may nest in an entry.  Far below the
# interpreter's recursion limit, so the encoder never meets that limit and
# the boundary is the same on every Python; a message nested beyond what
# the parser can take is not JSON at all (a RecursionError).
MAX_DEPTH = 512


def _parse_int(text):
    return int(text) if len(text) <= _MAX_INT_DIGITS else BigInt(text)


def _reject_constant(name):
    raise ValueError('%s is not JSON' % name)


_decoder = json.JSONDecoder(parse_int=_parse_int,
                            parse_constant=_reject_constant)


def parse_json(data):
    """Parse one JSON text from UTF-8 bytes, as JavaScript's JSON.parse would.

    Raises ValueError for anything JSON.parse would refuse (NaN, Infinity,
    invalid UTF-8 included) and RecursionError for absurd nesting.  Integers
    come back as ``int``; an integer literal of more than 600 digits comes
    back as a ``BigInt``.
    """
    return _decoder.decode(data.decode('utf-8'))


def canonical_json(value):
    """The canonical UTF-8 bytes of a parsed JSON value.

    As fast-json-stable-stringify: object keys sorted by UTF-16 code units,
    no white space, strings and numbers as JSON.stringify writes them.  Two
    deliberate differences: integers keep all their digits (JavaScript would
    round those beyond 2**53), and a number too large for a double raises
    ValueError (JavaScript would store null).  So does nesting deeper than
    ``MAX_DEPTH``.
    """
    parts = _Parts()
    _encode(value, parts.append, 1)
    text = parts.join()
    try:
        return text.encode('utf-8')
    except UnicodeEncodeError:
        return _escape_lone_surrogates(text).encode('utf-8')


def _reject_float(text):
    raise ValueError('a fraction or an exponent: %s' % text)


# For JSON text that is most likely in canonical form already: with no
# number but integers and no character beyond U+FFFF, the canonical form is
# what these two write, at C's speed.  (Of a key beyond U+FFFF, UTF-16
# order is not Python's; floats print as JavaScript prints them only in
# canonical_json.)
_plain_decoder = json.JSONDecoder(parse_int=_parse_int,
                                  parse_float=_reject_float,
                                  parse_constant=_reject_constant)
_plain_encoder = json.JSONEncoder(ensure_ascii=False, check_circular=False,
                                  allow_nan=False, sort_keys=True,
                                  separators=(',', ':'))
_BEYOND_BMP = re.compile(b'[\xf0-\xf4]')


def _canonical_form(data):
    """The canonical bytes of the JSON text ``data`` (UTF-8): ``data``
    itself when it is canonical, found quickly for most entries, as a
    tcplogserver primary sends them.  Raises ValueError and RecursionError
    as parse_json and canonical_json do."""
    # Nesting is no deeper than the brackets are many (MAX_DEPTH is not
    # checked on this way).
    if (data.count(b'[') + data.count(b'{') <= MAX_DEPTH
            and (data.isascii() or not _BEYOND_BMP.search(data))):
        try:
            value = _plain_decoder.decode(data.decode('utf-8'))
            if _plain_encoder.encode(value).encode('utf-8') == data:
                return data
        except (ValueError, TypeError, UnicodeEncodeError):
            pass        # a float, a BigInt, a lone surrogate: the long way
    return canonical_json(parse_json(data))


class _Parts(list):
    """The encoder's output: short strings, and ``chunks`` of them joined.

    A huge entry of tiny values (16 MiB of ``[0,0,...]``) would otherwise
    cost a string object per token: 40 times the entry's size in memory.
    """

    chunks = None

    def compact(self):
        if self.chunks is None:
            self.chunks = []
        self.chunks.append(''.join(self))
        self.clear()

    def join(self):
        if self.chunks is None:
            return ''.join(self)
        self.compact()
        return ''.join(self.chunks)


_ENCODE_CHUNK = 4096            # parts joined into one chunk
_LARGE_CONTAINER = 256          # items after which a container compacts


def _encode(value, out, depth):
    # out is the append of a _Parts, which large containers compact.
    # Types are tested exactly: bool is an int.
    kind = type(value)
    if kind is str:
        out(_encode_string(value))
    elif kind is dict or kind is list:
        if depth > MAX_DEPTH:
            raise ValueError('entry nested deeper than %d levels' % MAX_DEPTH)
        large = len(value) > _LARGE_CONTAINER
        if kind is dict:
            keys = sorted(value) if all(k.isascii() for k in value) \
                else sorted(value, key=_utf16_order)
            out('{')
            first = True
            for key in keys:
                if not first:
                    out(',')
                first = False
                out(_encode_string(key))
                out(':')
                _encode(value[key], out, depth + 1)
                if large and len(out.__self__) > _ENCODE_CHUNK:
                    out.__self__.compact()
            out('}')
        else:
            out('[')
            for i, item in enumerate(value):
                if i:
                    out(',')
                _encode(item, out, depth + 1)
                if large and len(out.__self__) > _ENCODE_CHUNK:
                    out.__self__.compact()
            out(']')
        if len(out.__self__) > _ENCODE_CHUNK:
            out.__self__.compact()
    elif value is None:
        out('null')
    elif value is True:
        out('true')
    elif value is False:
        out('false')
    elif kind is int:
        out(str(value))
    elif kind is BigInt:
        out(value.digits)
    elif kind is float:
        out(_js_number(value))
    else:
        raise TypeError('not a JSON value: %r' % (value,))


# White space JSON allows between tokens: what a line that is only white
# space holds.
_JSON_SPACE = b' \t\r\n'

# Quotes, escapes \b \f \n \r \t and writes other controls as \u00xx; leaves
# everything else, U+007F and U+2028 included, as it is: as JSON.stringify.
_encode_string = json.encoder.encode_basestring

_LONE_SURROGATE = re.compile('[\ud800-\udfff]')


def _escape_lone_surrogates(text):
    # JSON decoding joins every valid surrogate pair, so any surrogate left in
    # a str is lone; JSON.stringify writes those as lowercase \u escapes.
    return _LONE_SURROGATE.sub(lambda m: '\\u%04x' % ord(m.group()), text)


def _utf16_order(key):
    return key.encode('utf-16-be', 'surrogatepass')


def _js_number(x):
    """Write a float as JavaScript's Number.prototype.toString does."""
    if not math.isfinite(x):
        raise ValueError('number too large for a double')
    if x == 0:
        return '0'
    # repr gives the shortest digits that read back as x, which is also what
    # JavaScript chooses; only the layout of those digits differs.
    text = repr(x)
    sign = ''
    if text[0] == '-':
        sign, text = '-', text[1:]
    mantissa, _, exponent = text.partition('e')
    whole, _, fraction = mantissa.partition('.')
    digits = whole + fraction
    point = len(whole) + int(exponent or 0)      # x = 0.DIGITS * 10**point
    stripped = digits.lstrip('0')
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip('0')
    k, n = len(digits), point
    if k <= n <= 21:
        return sign + digits + '0' * (n - k)
    if 0 < n <= 21:
        return sign + digits[:n] + '.' + digits[n:]
    if -6 < n <= 0:
        return sign + '0.' + '0' * -n + digits
    e = n - 1
    exp = ('e+%d' if e >= 0 else 'e%d') % e
    if k == 1:
        return sign + digits + exp
    return sign + digits[0] + '.' + digits[1:] + exp


# ============================================================================
# Storage
# ============================================================================

MEMORY = 'memory'


def sha256_hex(data):
    """The default hash: SHA-256 of the canonical bytes, in lowercase hex."""
    return hashlib.sha256(data).hexdigest()


def _write_all(fd, data):
    written = os.write(fd, data)
    if written < len(data):         # rare: a signal, or a full disk
        view = memoryview(data)[written:]
        while view:
            view = view[os.write(fd, view):]


def _read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 16)
        chunks.append(chunk)
        if len(chunk) < 1 << 16:
            return b''.join(chunks)


def _flush(fd):
    """Make a file's written data durable (and the file findable)."""
    os.fsync(fd)


def _flush_filesystem(fd):
    """Make everything written on fd's filesystem durable, in one call.

    Linux's syncfs covers the data of any number of new files at once; where
    it is missing this returns False and the caller flushes file by file.
    """
    if _syncfs is None:
        return False
    if _syncfs(fd) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return True


def _make_folders(path, made=None):
    """Make a folder, and any missing above it, each its owner's only
    (os.makedirs would give those above the umask's permissions).  Each
    folder made is added to the list ``made`` as soon as it is made."""
    parent = os.path.dirname(os.path.normpath(path))
    if parent and not os.path.isdir(parent):
        _make_folders(parent, made)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return
    if made is not None:
        made.append(path)
    _flush_directory_of(path)


def _flush_directory_of(path):
    """Make a new file's or folder's entry in its parent folder durable."""
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        _flush(fd)
    finally:
        os.close(fd)


def _libc_function(name, *argument_types):
    """A function of the C library, or None where it is missing (syncfs
    is Linux's)."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    function.argtypes = list(argument_types)
    function.restype = ctypes.c_int
    return function


_syncfs = _libc_function('syncfs', ctypes.c_int)


class BlobStore:
    """Where a ``Log`` keeps its entries: blobs (bytes) by name.

    A store must have ``get`` and ``put``; the other methods have defaults
    that suit a store which cannot tell (``empty``) or has nothing to do.
    ``MemoryBlobs`` and ``FileBlobs`` are the two the server uses; subclass
    this one to keep blobs elsewhere.
    """

    def get(self, name):
        """The blob's bytes; KeyError when absent, OSError when it cannot
        be read."""
        raise NotImplementedError

    def put(self, blobs, sync=True):
        """Store a list of ``(name, data)`` pairs; a dict of the names it
        could not store, each with the exception that says why.  With
        ``sync`` true the blobs stored are durable when it returns."""
        raise NotImplementedError

    def empty(self):
        """True when the store certainly holds no blob at all.  A log with
        entries over an empty store is refused (the wrong store, say)."""
        return False

    def sync(self):
        """Make every blob the store holds durable."""

    def flushed_with(self, fd):
        """True if a flush of the file system of the file open as ``fd``
        (Linux's syncfs) makes the blobs that ``put`` stored with ``sync``
        false durable, names and all: then the log flushes its lines and
        its blobs at once.  False (the default): ``put`` flushes them."""
        return False

    def discard_unflushed(self):
        """Remove the blobs that the latest ``put`` with ``sync`` false
        wrote (not those it found stored): the flush that was to make them
        durable failed, and a later ``put`` must not find them and take
        them for durable."""

    def unfinished(self):
        """What blobs being written when a process died left behind."""
        return []

    def remove_unfinished(self, stopping=None):
        """Remove what ``unfinished`` lists; how many were removed.
        ``stopping()``, if given, true ends it early."""
        return 0

    def close(self):
        """Let go of what the store holds open."""


class MemoryBlobs(BlobStore):
    """A blob store in a dict: nothing outlives the process."""

    def __init__(self):
        self._blobs = {}

    def get(self, name):
        return self._blobs[name]

    def put(self, blobs, sync=True):
        for name, data in blobs:
            self._blobs[name] = data
        return {}

    def empty(self):
        return not self._blobs


class FileBlobs(BlobStore):
    """A blob store in a directory: one file per blob, named by its hash.

    The layout of fs-blob-store as the Node.js server uses it: flat, each
    file holding the entry's canonical JSON.  A new blob is made under its
    own name (``O_EXCL``: one operation on the directory, where a
    temporary name and a rename took two), written, then flushed.  So a
    crash can leave a blob under its name cut short; but only the line of
    an entry never acknowledged can name it, and the log's recovery cuts
    that (see ``Log._recover``).  A blob found under its name is trusted
    only if it holds the entry's bytes; one that does not (a crash's, or a
    disk's damage) is rewritten under a temporary name (``.NAME.tmp``) and
    renamed over, so that no crash makes it worse.  With ``create`` false a
    missing directory is an error (FileNotFoundError) instead of being
    made.
    """

    def __init__(self, path, create=True):
        if create and not os.path.isdir(path):
            _make_folders(path)
        self.path = path
        self._dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        # Temporary names in use by put, which remove_unfinished leaves be.
        self._writing = set()
        self._writing_lock = threading.Lock()
        # The blobs the latest put made, unflushed (see discard_unflushed).
        self._unflushed = []

    def get(self, name):
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=self._dir_fd)
        except FileNotFoundError:
            raise KeyError(name) from None
        try:
            return _read_all(fd)
        finally:
            os.close(fd)

    def put(self, blobs, sync=True):
        failed = {}
        seen = set()
        made = []                   # names of the blobs written, in order
        fds = []                    # ... their files, open until flushed
        found = False               # a blob stored already (by whom?)
        for name, data in blobs:
            if name in seen:
                continue
            seen.add(name)
            try:
                fd = os.open(name, _NEW_BLOB, 0o600, dir_fd=self._dir_fd)
            except FileExistsError:
                found = True
                try:
                    if self._keep(name, data, sync):
                        made.append(name)
                except OSError as error:
                    failed[name] = error
                continue
            except OSError as error:
                failed[name] = error
                continue
            try:
                _write_all(fd, data)
            except OSError as error:
                # A full disk, say: what was written must not be found by
                # a later put of the entry, nor be flushed.
                os.close(fd)
                failed[name] = error
                self._remove([name])
                continue
            made.append(name)
            fds.append(fd)
        try:
            if sync and (made or found) and not _flush_filesystem(
                    self._dir_fd):
                for fd in fds:
                    _flush(fd)
                _flush(self._dir_fd)
        except OSError as error:
            failed.update((name, error) for name in made)
            self._remove(made)
        finally:
            for fd in fds:
                os.close(fd)
        self._unflushed = [] if sync else made
        return failed

    def _keep(self, name, data, sync):
        """A blob named name exists: make sure it holds data, durably.
        True if it had to be written over."""
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=self._dir_fd)
        except FileNotFoundError:
            fd = None               # removed meanwhile, by hand
        try:
            if fd is not None and _read_all(fd) == data:
                if sync and _syncfs is None:
                    # Where one flush of the file system does not cover it:
                    # another process may have written it, and died since.
                    _flush(fd)
                return False
        except OSError:
            pass                    # unreadable: written over, as damaged
        finally:
            if fd is not None:
                os.close(fd)
        self._replace(name, data, sync)
        return True

    def _replace(self, name, data, sync):
        # Rare (a damaged blob), so it may cost a flush of its own.
        temporary = _temporary_name(name)
        with self._writing_lock:
            self._writing.add(temporary)
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                         0o600, dir_fd=self._dir_fd)
            try:
                _write_all(fd, data)
                if sync:
                    _flush(fd)
            finally:
                os.close(fd)
            os.rename(temporary, name, src_dir_fd=self._dir_fd,
                      dst_dir_fd=self._dir_fd)
            if sync:
                _flush(self._dir_fd)
        except OSError:
            self._remove([temporary])
            raise
        finally:
            with self._writing_lock:
                self._writing.discard(temporary)

    def flushed_with(self, fd):
        # syncfs flushes a whole file system: the blobs' names and bytes.
        return (_syncfs is not None
                and os.fstat(fd).st_dev == os.fstat(self._dir_fd).st_dev)

    def discard_unflushed(self):
        self._remove(self._unflushed)
        self._unflushed = []

    def _remove(self, names):
        # Blobs that may not be durable: a later put of the same entry
        # must not find them, and trust them, unflushed.
        for name in names:
            try:
                os.unlink(name, dir_fd=self._dir_fd)
            except OSError:
                pass

    def empty(self):
        with os.scandir(self.path) as entries:
            return not any(not entry.name.startswith('.')
                           for entry in entries)

    def sync(self):
        if not _flush_filesystem(self._dir_fd):
            os.sync()
        _flush(self._dir_fd)

    def unfinished(self):
        # A blob is acknowledged only under its own name, so a temporary
        # file never holds an acknowledged entry.
        return [name for name in os.listdir(self._dir_fd)
                if _TEMPORARY.fullmatch(name)]

    def remove_unfinished(self, stopping=None):
        """Remove what ``unfinished`` lists; how many were removed.  Safe
        while the store takes blobs: those it is writing are left be.
        ``stopping()``, if given, true ends it early."""
        removed = 0
        for name in self.unfinished():
            if stopping is not None and stopping():
                break
            with self._writing_lock:
                if name in self._writing:
                    continue
                try:
                    os.unlink(name, dir_fd=self._dir_fd)
                except FileNotFoundError:
                    continue
            removed += 1
        return removed

    def close(self):
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


_NEW_BLOB = os.O_WRONLY | os.O_CREAT | os.O_EXCL


def _temporary_name(name):
    return '.%s.tmp' % name


_TEMPORARY = re.compile(r'\.[0-9a-f]+\.tmp')


class LogError(Exception):
    """The log cannot take writes: the message says why, for the client."""


class _HashFile:
    """FILE on disk: the hash lines, written at the end, read by offset.
    (FILE.ids too, with ``lock`` false: FILE's lock covers it.)"""

    def __init__(self, path, lock=True):
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            _flush_directory_of(path)
        except FileExistsError:
            self._fd = os.open(path, os.O_RDWR)
        if not lock:
            return
        try:
            # Two servers on one log would number entries over each other,
            # and one's recovery could cut the other's commit in progress.
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.close()
            raise LogError('FILE %s is in use by another server' % path)
        except BaseException:
            self.close()
            raise

    def size(self):
        return os.fstat(self._fd).st_size

    def read(self, offset, length):
        return os.pread(self._fd, length, offset)

    def write(self, data, offset):
        view = memoryview(data)
        while view:
            written = os.pwrite(self._fd, view, offset)
            view, offset = view[written:], offset + written

    def truncate(self, size):
        os.ftruncate(self._fd, size)

    def flush(self, everything=False):
        """Make what was written durable; with ``everything``, all that was
        written on the file's file system, in one call (OSError where that
        cannot be done: see ``_flush_filesystem``)."""
        if not everything:
            os.fdatasync(self._fd)
        elif not _flush_filesystem(self._fd):
            raise OSError(errno.ENOSYS, 'syncfs is missing', self.path)

    def shares_flush_with(self, blobs):
        return blobs.flushed_with(self._fd)

    def set_aside(self, lines):
        """Keep lines about to be cut in FILE.cut, durably; its path."""
        path = self.path + '.cut'
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            _write_all(fd, lines)
            _flush(fd)
        finally:
            os.close(fd)
        _flush_directory_of(path)
        return path

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _HashMemory:
    """FILE=memory: the hash lines in a bytearray."""

    path = MEMORY

    def __init__(self):
        self._data = bytearray()

    def size(self):
        return len(self._data)

    def read(self, offset, length):
        return bytes(self._data[offset:offset + length])

    def write(self, data, offset):
        self._data[offset:] = data

    def truncate(self, size):
        del self._data[size:]

    def flush(self, everything=False):
        pass

    def shares_flush_with(self, blobs):
        return False

    def set_aside(self, lines):
        return None

    def close(self):
        pass


_INDEX_DIGITS = 20      # of an index, in FILE.ids and FILE.commit


class _LastCommit:
    """FILE.commit: the first and last index of the latest commit that
    flushes its blobs and its lines at once, as ``FIRST LAST\n`` (each in
    20 digits), written over by each such commit before its flush, and
    again once it is durable, then as ``LAST+1 LAST`` (none under way).

    After a crash in the middle of such a flush, FILE may hold lines of
    that commit whose blobs did not reach the disk, before lines whose
    blobs did: recovery must know where the commit began, and this says.
    It says the commit the crash cut short, or that none was under way
    after the one before it (its write did not reach the disk, or the
    crash came before it), or names that one, whose flush ended: see
    ``Log._recover``.
    """

    _SIZE = 2 * _INDEX_DIGITS + 2
    _RECORD = re.compile(b'([0-9]{%d}) ([0-9]{%d})\n'
                         % (_INDEX_DIGITS, _INDEX_DIGITS))

    def __init__(self, file_path):
        self.path = file_path + '.commit'
        # Made at the first commit it names: a log that never has one
        # (sync off, blobs apart) has no file.
        self._store = (_HashFile(self.path, lock=False)
                       if os.path.exists(self.path) else None)

    def read(self):
        """(first, last) of the commit it names; None if it names none
        (there is no file), False if it is damaged."""
        data = b'' if self._store is None else self._store.read(
            0, self._SIZE + 1)
        if not data:
            return None
        found = self._RECORD.fullmatch(data)
        if found is None:
            return False
        return int(found.group(1)), int(found.group(2))

    def write(self, first, last):
        if self._store is None:
            # Made durable, name and bytes, before a commit relies on it:
            # saying that none was under way before this one.
            self._store = _HashFile(self.path, lock=False)
            try:
                self._write(first, first - 1)
                self._store.flush()
            except BaseException:
                self._store.close()     # the next commit makes it again
                self._store = None
                raise
        self._write(first, last)

    def _write(self, first, last):
        self._store.write(b'%020d %020d\n' % (first, last), 0)

    def reset(self, head):
        """Say durably, if the file exists, that no commit is under way."""
        if self._store is not None:
            self._write(head + 1, head)
            self._store.flush()

    def close(self):
        if self._store is not None:
            self._store.close()


# What can be wrong with an entry, as read errors and verify name it.
DAMAGED_LINE = 'damaged line'
MISSING_BLOB = 'missing blob'
UNREADABLE_BLOB = 'unreadable blob'
WRONG_BLOB = 'blob does not match its hash'
TORN_LINE = 'torn last line'


class Problem(collections.namedtuple('Problem', ('kind', 'message'))):
    """What is wrong with an entry: its ``kind`` (one of DAMAGED_LINE,
    MISSING_BLOB, UNREADABLE_BLOB, WRONG_BLOB, TORN_LINE) and a
    ``message`` that says which entry or blob, for a person."""

    __slots__ = ()


# Problems that show an entry at the end of the log was never acknowledged:
# its blob is made durable before its line is written, and the line before
# the acknowledgement.  A blob that cannot be read proves nothing.
_NEVER_ACKNOWLEDGED = frozenset((DAMAGED_LINE, MISSING_BLOB, WRONG_BLOB))

# The latest entries, kept in memory for the readers that follow the log.
_RECENT_ENTRIES = 1 << 16
_RECENT_BYTES = 1 << 26

# Writes in one commit, at most.  Recovery looks back no further than this
# for entries that a crash left unbacked.
_MAX_BATCH = 4096


class _EntryChecker:
    """Tells whether an entry is whole: its line, its blob, the blob's hash."""

    def __init__(self, blobs, hash_function):
        self.blobs = blobs
        self.hash = hash_function
        name_length = len(hash_function(b''))
        self.line_size = name_length + 1
        self._line = re.compile(b'[0-9a-f]{%d}\n' % name_length)

    def check(self, line):
        """An entry's blob, given its line: (data, None) or (None, Problem)."""
        if not self._line.fullmatch(line):
            return None, Problem(DAMAGED_LINE, 'its line in the log is damaged')
        name = line[:-1].decode('ascii')
        try:
            data = self.blobs.get(name)
        except KeyError:
            return None, Problem(MISSING_BLOB, 'blob %s is missing' % name)
        except Exception as error:  # noqa: BLE001 -- an embedder's store's too
            return None, Problem(UNREADABLE_BLOB, 'blob %s cannot be read: %s'
                                 % (name, _describe(error)))
        if self.hash(data) != name:
            return None, Problem(WRONG_BLOB,
                                 'blob %s does not match its hash' % name)
        return data, None


class _Pending:
    """An entry on its way into the log, until it has an index or error:
    its key, if an idempotent write's, and if its key is that of an
    earlier entry of its commit, that entry (``original``)."""

    __slots__ = ('data', 'error', 'index', 'key', 'name', 'original')

    def __init__(self, data, name, key=None):
        self.data, self.name, self.key = data, name, key
        self.index = self.error = self.original = None


# -- the keys of idempotent writes -------------------------------------------

class Duplicate(int):
    """What ``Log.append`` gives for an entry whose key names an entry
    stored before, which it does not store again: that entry's index."""

    __slots__ = ()

    def __repr__(self):
        return 'Duplicate(%d)' % self


# Entries whose keys a log keeps in memory, by default, and the bytes of a
# key.  The default took 23 MiB (bench W7): 150 bytes a key, and the keys
# of the latest entries kept for the followers' reads besides.
IDEMPOTENCE_WINDOW = 100_000
KEY_SIZE = 16
_RECORDS_READ = 1 << 12     # records read from FILE.ids at once


class _Ids:
    """The keys of a log's idempotent entries: in memory, the entry each
    names, for the latest ``window`` entries (``index_of``); on disk, in
    FILE.ids, every key ever given.

    FILE.ids holds a record for each entry that has a key, in index order,
    every record of one size: ``INDEX KEY HASH\n``, the index in 20 digits,
    the key in hex, and the entry's hash as in FILE.  A commit writes and
    flushes its records before it writes its lines, so an entry in FILE
    has its key on disk; a record past the head (a crash came between) is
    cut when the log opens, and a record whose hash is not FILE's at its
    index (FILE was cut, and another server appended) names nothing.  An
    entry without a record has no key: the Node.js server, which keeps
    none, serves and appends to the log all the same.  The file is made
    at the first record.
    """

    def __init__(self, file_path, window, name_length, logger):
        self.window = window
        self.path = MEMORY if file_path == MEMORY else file_path + '.ids'
        self.logger = logger
        self.record_size = _INDEX_DIGITS + 2 * KEY_SIZE + name_length + 3
        self._line_size = name_length + 1
        self._record = re.compile(b'([0-9]{%d}) ([0-9a-f]{%d}) ([0-9a-f]{%d})\n'
                                  % (_INDEX_DIGITS, 2 * KEY_SIZE, name_length))
        self._store = None
        if self.path == MEMORY:
            self._store = _HashMemory()
        elif os.path.exists(self.path):
            self._store = _HashFile(self.path, lock=False)
        self.records = 0            # in FILE.ids
        self.conflicts = 0          # entries refused: their key was taken
        self._durable = 0           # ... of entries at or below the head
        self.index_of = {}          # key -> index, of the latest entries
        self._keys = collections.deque()        # ... oldest first
        self._indices = collections.deque()     # ... and their indices
        # The keys of entries from an index on, for the reads that copy
        # them: (that index, {index: key}), replaced whole.
        self._recent = (1, {})

    # -- opening --------------------------------------------------------------

    def recover(self, head, lines):
        """Cut the records of entries past ``head`` (and a torn one), and
        take in the keys of the latest ``window`` entries.  ``lines(first,
        last)`` reads FILE's lines of those entries."""
        self._recent = (head + 1, {})
        if self._store is None:
            return
        size = self._store.size()
        records = kept = size // self.record_size
        for number, index, _ in self._back_from(records):
            if index is not None and index <= head:
                break
            kept = number
        if kept < records or size % self.record_size:
            self._store.truncate(kept * self.record_size)
            self._store.flush()     # cut for good: see undo
            self.logger.warning('cut the ids of entries not in the log', extra={
                'file': self.path, 'head': head, 'records': records - kept,
                'bytes': size % self.record_size})
        self.records = self._durable = kept
        found, damaged = [], 0
        for _, index, match in self._back_from(kept):
            if index is None:
                damaged += 1
            elif index <= head - self.window:
                break
            else:
                found.append((index, match))
        if found:
            self._take_in(found[::-1], lines(found[-1][0], head))
        if damaged:
            self.logger.error('damaged records in the ids of the log are '
                              'ignored', extra={'file': self.path,
                                                'records': damaged})

    def _take_in(self, found, lines):
        """Keep in memory the keys of records found, (index, match) in
        index order, which name the entry that ``lines`` (FILE's, from
        the first found) give their index."""
        named = self._naming(found, found[0][0], lines)
        for index, key in named:
            self._add(key, index)
        if len(named) < len(found):
            self.logger.warning(
                'ids kept for entries no longer in the log are ignored',
                extra={'file': self.path, 'records': len(found) - len(named)})

    def _naming(self, found, first, lines):
        """Of records found, (index, match), those whose hash is FILE's
        line at their index (``lines``, FILE's from entry ``first`` on):
        ``(index, key)``."""
        size = self._line_size
        return [(index, bytes.fromhex(match.group(2).decode('ascii')))
                for index, match in found
                if lines[(index - first) * size:
                         (index - first + 1) * size - 1] == match.group(3)]

    def _back_from(self, end):
        """The records before record ``end``, the last first, each as
        (number, index, match): index and match None if it is damaged."""
        size = self.record_size
        while end > 0:
            start = max(0, end - _RECORDS_READ)
            data = self._store.read(start * size, (end - start) * size)
            for number in range(end - 1, start - 1, -1):
                offset = (number - start) * size
                match = self._record.fullmatch(data, offset, offset + size)
                yield (number, None if match is None
                       else int(match.group(1)), match)
            end = start

    # -- writing (by the committing thread) -----------------------------------

    def resolve(self, batch, name_at):
        """Before a commit, under the log's lock: settle the entries of
        batch whose key names an entry (a ``Duplicate`` if it is theirs, a
        LogError if not), and link to its ``original`` one whose key an
        entry before it in the batch has.  Returns the entries to store.
        ``name_at(index)`` is the hash of the entry at index."""
        stored, first = [], {}
        for entry in batch:
            key = entry.key
            if key is None:
                stored.append(entry)
                continue
            index = self.index_of.get(key)
            earlier = first.get(key) if index is None else None
            if index is not None and name_at(index) == entry.name:
                entry.index = Duplicate(index)
            elif index is not None:
                self.conflicts += 1
                entry.error = LogError(
                    'this id was given to another entry, entry %d' % index)
            elif earlier is None:
                first[key] = entry
                stored.append(entry)
            elif earlier.name == entry.name:
                entry.original = earlier
            else:
                self.conflicts += 1
                entry.error = LogError('this id was given to another entry '
                                       'sent with it')
        return stored

    def write(self, records):
        """Write a commit's records, ``(index, key, line)`` (the entry's
        line in FILE), after the others; their offset in the file, to undo
        them by."""
        if self._store is None:
            self._store = _HashFile(self.path, lock=False)
        offset = self.records * self.record_size
        hexlify = binascii.hexlify
        self._store.write(b''.join([
            b'%020d %s %s' % (index, hexlify(key), line)
            for index, key, line in records]), offset)
        self.records += len(records)
        return offset

    def flush(self, everything=False):
        self._store.flush(everything)

    def undo(self, offset, sync):
        """Cut the records from offset on, durably with ``sync`` (OSError
        if it cannot be done): they were flushed, and must not come back
        under entries of a later commit."""
        self.records = offset // self.record_size
        if self._store is not None:
            self._store.truncate(offset)
            if sync:
                self._store.flush()

    def remember(self, entries, head):
        """Under the log's lock: the entries of a commit are in the log,
        which now ends at head; forget the keys of entries that are no
        longer among the latest ``window``."""
        recent = self._recent[1]
        index_of, keys, indices = self.index_of, self._keys, self._indices
        for entry in entries:
            key, index = entry.key, entry.index
            if key is not None and index is not None:
                # A key given again (it had been forgotten, or a primary's
                # forgets sooner) names the newest.
                index_of[key] = index
                keys.append(key)
                indices.append(index)
                recent[index] = key
        if len(recent) > 2 * _RECENT_ENTRIES:
            kept = list(recent.items())[-_RECENT_ENTRIES:]
            self._recent = (kept[0][0], dict(kept))
        self._durable = self.records
        floor = head - self.window
        while indices and indices[0] <= floor:
            index, key = indices.popleft(), keys.popleft()
            if index_of.get(key) == index:
                del index_of[key]

    def _add(self, key, index):
        self.index_of[key] = index
        self._keys.append(key)
        self._indices.append(index)

    # -- reading (by any thread) ----------------------------------------------

    def keys(self, first, last, lines):
        """The keys of the entries first..last (at most the head) that
        have one: ``{index: key}``.  ``lines(first, last)`` reads FILE's
        lines, which records read from FILE.ids must match."""
        since, recent = self._recent
        if first >= since:
            return {index: recent[index] for index in range(first, last + 1)
                    if index in recent}
        found = []
        number = self._first_from(first)
        size = self.record_size
        while number < self._durable and (not found or found[-1][0] <= last):
            data = self._store.read(number * size, _RECORDS_READ * size)
            for offset in range(0, len(data) - size + 1, size):
                match = self._record.fullmatch(data, offset, offset + size)
                if match is not None:
                    found.append((int(match.group(1)), match))
            number += _RECORDS_READ
        found = [(index, match) for index, match in found
                 if first <= index <= last]
        if not found:
            return {}
        return dict(self._naming(found, first, lines(first, last)))

    def _first_from(self, first):
        """The number of the first record of an entry at or after first
        (records are in index order; a damaged one is passed over)."""
        low, high = 0, self._durable
        size = self.record_size
        while low < high:
            middle = (low + high) // 2
            try:
                index = int(self._store.read(middle * size, _INDEX_DIGITS))
            except ValueError:
                index = 0
            if index < first:
                low = middle + 1
            else:
                high = middle
        return low

    def close(self):
        if self._store is not None:
            self._store.close()


# -- counting, for monitoring ------------------------------------------------

class _Counter:
    """A number that only grows, added to by any thread."""

    __slots__ = ('_lock', 'value')

    def __init__(self):
        self._lock = threading.Lock()
        self.value = 0

    def add(self, amount=1):
        with self._lock:
            self.value += amount


class _Histogram:
    """Observations counted by the least of ``bounds`` they do not
    exceed, as Prometheus counts them.  Not locked: its owner observes
    under a lock of its own, and takes ``snapshot`` under it too."""

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self._counts = [0] * (len(self.bounds) + 1)    # the last: beyond all
        self._sum = 0

    def observe(self, value):
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self._sum += value

    def snapshot(self):
        """(bounds, cumulative counts by bound then all, sum)."""
        return self.bounds, list(itertools.accumulate(self._counts)), \
            self._sum


# Entries a commit holds, and seconds it takes (blobs, lines, flushes) and
# that FILE's flush takes.
_COMMIT_SIZES = (1, 4, 16, 64, 256, 1024, 4096)
_COMMIT_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 10.0)


class Log:
    """The append-only log: a file of hash lines plus a blob store.

    It deals in entries as their canonical JSON (bytes) and in indices:
    ``append`` takes entries and gives each its index, ``read`` gives
    entries by index.  Line N of the file is the hash of entry N, so entry
    N's line starts at byte ``(N - 1) * line_size`` and the head is the
    file's size divided by the line size.  Readers share, without a lock,
    the head (``self.head``) and the latest entries kept in memory; the
    head counts durable entries, and moves only with ``self.appended`` (a
    Condition) held, which wakes the readers waiting on it.

    ``append`` does group commit: entries that arrive while a commit is
    under way queue up, and the next writer to find no commit running
    commits them (up to ``_MAX_BATCH``) at once with one flush, on behalf
    of every writer waiting.  With ``sync`` false nothing is flushed: an
    entry counts as appended once the operating system has it.

    A log that copies another (a follower's) is given ``refuse_appends``,
    the message its ``append`` refuses every entry with; ``extend`` stores
    the copied entries at the indices they have in the other log.

    An entry may come with a key (``KEY_SIZE`` bytes, say a digest of the
    id of an idempotent write): then, for as long as it is among the
    latest ``idempotence_window`` entries, an entry with the same key is
    not stored again (see ``append``).  Keys are kept in FILE.ids (see
    ``_Ids``); with a window of 0 they are neither kept nor looked up.

    It counts, for monitoring (``counts``): the entries stored, refused and
    failed since it was opened, and its commits' sizes and durations.

    Opening a log recovers it from a crash (see ``_recover``).
    """

    def __init__(self, path, blobs, hash_function=None, sync=True,
                 on_append=None, logger=None, refuse_appends=None,
                 idempotence_window=IDEMPOTENCE_WINDOW):
        self.blobs = blobs
        self.hash = hash_function or sha256_hex
        self._checker = _EntryChecker(blobs, self.hash)
        self.line_size = self._checker.line_size
        self.sync = sync
        self.on_append = on_append
        self.logger = logger or logging.getLogger('tcplogserver')
        self.appended = threading.Condition(threading.Lock())
        self._queue = []            # _Pending entries for the next commit
        self._keyed_queued = 0      # ... of them with a key, to look up
        self._committing = False
        self._broken = None         # why the log takes no more writes
        # Why append takes nothing, the log being a copy that only extend
        # adds to.
        self._refusal = (None if refuse_appends is None
                         else LogError(refuse_appends))
        self._recent = {}           # index -> blob, of the latest entries
        self._recent_bytes = 0
        # Counted under the lock.
        self._stored = self._failed = self._refused = 0
        self._duplicates = 0
        self._commit_sizes = _Histogram(_COMMIT_SIZES)
        self._commit_seconds = _Histogram(_COMMIT_SECONDS)
        self._flush_seconds = _Histogram(_COMMIT_SECONDS)
        self.idempotence_window = idempotence_window
        self._file = _HashMemory() if path == MEMORY else _HashFile(path)
        self._ids = self._last_commit = None
        try:
            if path != MEMORY:
                self._last_commit = _LastCommit(path)
            self._refuse_missing_blobs()
            self._recover()
            if idempotence_window:
                self._ids = _Ids(path, idempotence_window,
                                 self.line_size - 1, self.logger)
                self._ids.recover(self.head, self._lines)
            if sync:
                # Blobs written with sync off may still be in memory only,
                # and a write of the same entry would reuse them unflushed.
                blobs.sync()
                self._file.flush()
                if self._last_commit is not None:
                    self._last_commit.reset(self.head)      # recovered
            # One flush for a commit's blobs and lines, where one covers both.
            self._one_flush = sync and self._file.shares_flush_with(blobs)
        except BaseException:
            for part in (self._ids, self._last_commit, self._file):
                if part is not None:
                    part.close()
            raise
        self._recent_oldest = self.head + 1     # the lowest index in _recent

    def _refuse_missing_blobs(self):
        entries = self._file.size() // self.line_size
        # Unless every entry is of a commit a crash may have cut short, the
        # very first, whose blobs all failed to reach the disk.
        if (entries and self._last_commit_began(entries) > 0
                and self.blobs.empty()):
            # A mistyped BLOBS, or a volume not mounted: recovery would take
            # the entries for a crash's leftovers.
            raise LogError(
                'FILE %s holds %d entries, but the blob store is empty: is '
                'BLOBS the one they were written with?  (BLOBS=memory starts '
                'empty.)' % (self._file.path, entries))

    def _recover(self):
        """Cut from the end of the log what a crash left half-done.

        A torn last line goes.  Then the entries of the commit that
        FILE.commit says a crash may have cut short (see ``_LastCommit``):
        its lines and blobs were flushed at once, so any of its lines may
        have reached the disk without its blob.  From the first of them
        whose line is damaged or whose blob is missing or wrong, that one
        and every entry after it go: none was acknowledged.  Then, walking
        back from the end while entries are bad, so do entries whose line
        is damaged or whose blob is missing or wrong: where blobs are
        flushed before lines, a crash can leave such entries only at the
        end, before any writer was told of them.  The walk stops at the
        first whole entry.  A bad entry before a whole one may have been
        acknowledged, so it stays, to be served as a read error and
        reported by verify; and if more than one commit's worth of entries
        at the end are bad, no crash explains it, so nothing is cut.  What
        is cut is set aside in FILE.cut first.  Only the tail is read, so
        opening a log of millions of entries takes no longer.
        """
        size = self._file.size()
        head = size // self.line_size
        if size % self.line_size:
            self._file.truncate(head * self.line_size)
            self.logger.warning(
                'cut a torn line from the end of the log',
                extra={'file': self._file.path, 'head': head,
                       'bytes': size % self.line_size})
        cut = []                    # (index, Problem or None), in order
        for index in range(self._last_commit_began(head) + 1, head + 1):
            problem = self._problem(index)
            if cut or (problem is not None
                       and problem.kind in _NEVER_ACKNOWLEDGED):
                cut.append((index, problem))
        head -= len(cut)
        walked = []                 # (index, Problem), from the end back
        while head > 0 and len(walked) <= _MAX_BATCH:
            problem = self._problem(head)
            if problem is None or problem.kind not in _NEVER_ACKNOWLEDGED:
                break
            walked.append((head, problem))
            head -= 1
        if len(walked) > _MAX_BATCH:
            head += len(walked)
            self.logger.error(
                'the end of the log is damaged further back than one commit '
                'reaches; nothing cut; run verify', extra={
                    'file': self._file.path, 'head': head,
                    'error': walked[0][1].message})
        else:
            cut[:0] = walked[::-1]
        if cut:
            self._cut(head, cut)
        self.head = head

    def _last_commit_began(self, head):
        """The head before the latest commit that flushed blobs and lines
        at once, if a crash may have cut it short; else the head."""
        span = None if self._last_commit is None else self._last_commit.read()
        if span is None:            # none was made
            return head
        if span is False:
            # Damaged, which no crash explains: it may have been any of
            # the latest entries.
            return max(0, head - _MAX_BATCH)
        first, last = span
        if head <= last:
            return min(first - 1, head)
        if head - last <= _MAX_BATCH:
            # The one after it, whose write of FILE.commit did not reach
            # the disk.
            return last
        return head             # a server that keeps no FILE.commit wrote

    def _cut(self, head, cut):
        lines = self._file.read(head * self.line_size,
                                len(cut) * self.line_size)
        kept = self._file.set_aside(lines)
        self._file.truncate(head * self.line_size)
        problems = [problem for _, problem in cut if problem is not None]
        self.logger.warning(
            'cut unacknowledged entries from the end of the log', extra={
                'file': self._file.path, 'first': cut[0][0],
                'last': cut[-1][0], 'head': head, 'kept': kept,
                'problems': collections.Counter(
                    problem.kind for problem in problems),
                'whole': len(cut) - len(problems),
                'errors': [problem.message for problem in problems[:5]]})

    def _problem(self, index):
        line = self._file.read((index - 1) * self.line_size, self.line_size)
        return self._checker.check(line)[1]

    def _lines(self, first, last):
        return self._file.read((first - 1) * self.line_size,
                               (last - first + 1) * self.line_size)

    # -- writing ------------------------------------------------------------

    def append(self, entries, keys=None):
        """Append entries (each its canonical JSON, as bytes), in order.

        Returns once each is durable: a list with, for each entry, its
        index, or a ``LogError`` saying why it is not in the log (no index
        is used up for it).  ``keys``, if given, has for each entry its
        key (bytes) or None: an entry whose key names one of the latest
        ``idempotence_window`` entries is not stored, and gets that
        entry's index as a ``Duplicate`` if it is the same entry, or a
        LogError if it is not (the same for an entry whose key an entry
        before it in the same commit has).  A key is durable with its
        entry.
        """
        if not entries:
            return []
        if self._refusal is not None:
            with self.appended:
                self._refused += len(entries)
            return [self._refusal] * len(entries)
        pending = self._pending(entries, keys)
        with self.appended:
            self._queue.extend(pending)
            if keys is not None and self._ids is not None:
                self._keyed_queued += sum(key is not None for key in keys)
            last = pending[-1]
            while last.index is None and last.error is None:
                if self._committing:
                    self.appended.wait()
                else:
                    self._commit()
        return [entry.index if entry.error is None else entry.error
                for entry in pending]

    def _pending(self, entries, keys):
        if keys is None or self._ids is None:
            return [_Pending(data, self.hash(data)) for data in entries]
        if len(keys) != len(entries) or any(
                key is not None and (type(key) is not bytes
                                     or len(key) != KEY_SIZE)
                for key in keys):
            raise ValueError('keys: one for each entry, each None or %d '
                             'bytes' % KEY_SIZE)
        return [_Pending(data, self.hash(data), key)
                for data, key in zip(entries, keys)]

    def extend(self, first, entries, keys=None):
        """Store entries copied from another log at the indices they have
        there, ``first`` on, in one commit (at most ``_MAX_BATCH``), with
        their keys (as ``append`` takes them), which are kept, not looked
        up.

        Returns the head once they are durable.  Raises ``LogError`` if
        ``first`` is not one past the head, or if not every entry could be
        stored: then those before the first that failed are (an index is
        never skipped), and the head says how far it got.
        """
        if len(entries) > _MAX_BATCH:
            raise ValueError('at most %d entries at once' % _MAX_BATCH)
        pending = self._pending(entries, keys)
        with self.appended:
            while self._committing or self._queue:
                self.appended.wait()
            if first != self.head + 1:
                raise LogError('entry %d cannot be stored after entry %d, '
                               'the head' % (first, self.head))
            if not pending:
                return self.head
            self._queue.extend(pending)
            self._commit(in_order=True)
            failed = next((entry.error for entry in pending
                           if entry.error is not None), None)
            if failed is not None:
                raise failed
            return self.head

    def _commit(self, in_order=False):
        # Called with the lock held; releases it for the I/O.  in_order:
        # the batch's entries have indices already, so one that fails
        # fails those after it too.
        batch = stored = self._queue[:_MAX_BATCH]
        del self._queue[:_MAX_BATCH]
        if self._keyed_queued and not in_order:
            # Plain writes only, the most often: nothing to look up.
            stored = self._ids.resolve(batch, self.name)
            self._keyed_queued -= sum(entry.key is not None
                                      for entry in batch)
        self._committing = True
        head = self.head
        self.appended.release()
        error = interrupted = LogError('the write was interrupted')
        started = time.monotonic()
        flushed = None
        try:
            if self._broken is not None:
                error = self._broken
            else:
                flushed = self._store(stored, head, in_order)
                error = None
        except LogError as failure:
            error = failure
        except Exception as failure:    # an embedder's store, say: logged
            self.logger.exception('could not store a batch of writes')
            error = LogError('could not store the entry: %s'
                             % _describe(failure))
        finally:
            self.appended.acquire()
            self._committing = False
            if error is interrupted:
                # KeyboardInterrupt, say, in the committing thread: lines
                # may be past the head, where a smaller batch would leave
                # some standing.  Only a restart (and recovery) is safe.
                self._broken = LogError(
                    'a commit was interrupted: the log takes no writes until '
                    'the server restarts')
            self._number(stored, head, error, time.monotonic() - started,
                         flushed)
            if stored is not batch:
                self._settle(batch)

    def _number(self, batch, head, error, seconds, flushed=None):
        """Give a committed batch its indices (or error); wake everyone.
        It took seconds, flushed of them flushing FILE."""
        index = head
        for entry in batch:
            if error is not None:
                entry.error = error
            if entry.error is None:
                index += 1
                entry.index = index
                self._remember(index, entry.data)
        if index > head:
            self._commit_sizes.observe(index - head)
            self._commit_seconds.observe(seconds)
            if flushed is not None:
                self._flush_seconds.observe(flushed)
        self._stored += index - head
        self._failed += len(batch) - (index - head)
        if self._ids is not None:
            # Before the head moves: a read that sees an entry sees its key.
            self._ids.remember(batch, index)
        self.head = index
        self.appended.notify_all()
        if self.on_append is not None:
            # Still under the lock, so that calls come in index order.
            for entry in batch:
                if entry.index is not None:
                    self._call_on_append(entry)

    def _settle(self, batch):
        """The entries of a commit that it did not store: those that are
        their original's are what it became."""
        for entry in batch:
            original = entry.original
            if original is not None:
                if original.error is None:
                    entry.index = Duplicate(original.index)
                else:
                    entry.error = original.error
            if type(entry.index) is Duplicate:
                self._duplicates += 1

    def _store(self, batch, head, in_order=False):
        """Write blobs, ids and lines for a batch; flush; mark failed
        entries.  Returns the seconds the flush of FILE took, or None.

        Where one flush of the file system covers blobs and FILE alike
        (``_one_flush``), a commit of plain writes flushes once, after
        writing everything: a crash can then leave lines whose blobs did
        not reach the disk, but only this commit's, which FILE.commit
        tells recovery.  A commit with keys flushes blobs and ids first,
        then its lines (see ``_keep_ids``).  Elsewhere blobs are flushed
        before lines are written, so a line never names a missing blob.
        """
        one_flush = self._one_flush and _syncfs is not None
        failed = self.blobs.put([(entry.name, entry.data) for entry in batch],
                                self.sync and not one_flush)
        lines = []
        ids = []                    # (index, key, line) of keyed entries
        for entry in batch:
            error = failed.get(entry.name)
            if error is not None:
                entry.error = LogError(_describe(error))
                self.logger.error('could not store a blob', extra={
                    'hash': entry.name, 'error': str(entry.error)})
                if in_order:
                    for later in batch[len(lines) + 1:]:
                        later.error = LogError('an entry before it could '
                                               'not be stored')
                    break
            else:
                line = entry.name.encode('ascii') + b'\n'
                lines.append(line)
                if entry.key is not None:
                    ids.append((head + len(lines), entry.key, line))
        if not lines:
            return None
        offset = head * self.line_size
        ids_offset = None
        try:
            if one_flush:
                self._last_commit.write(head + 1, head + len(lines))
            if ids:
                ids_offset = self._keep_ids(ids, one_flush)
            self._file.write(b''.join(lines), offset)
        except OSError as error:
            self.logger.error('could not append to the log', extra={
                'file': self._file.path, 'error': _describe(error)})
            self._undo(offset, ids_offset, one_flush)
            raise LogError('could not append to the log: %s'
                           % _describe(error)) from None
        if not self.sync:
            return None
        started = time.monotonic()
        try:
            self._file.flush(everything=one_flush and not ids)
        except OSError as error:
            self._fail_flush(offset, ids_offset, one_flush, error)
        flushed = time.monotonic() - started
        if one_flush:
            self._commit_done(head + len(lines))
        return flushed

    def _commit_done(self, head):
        # Unflushed, but a process that dies now leaves it to the next,
        # which then need not check this commit's blobs: the page cache
        # outlives the process.  After a power cut the commit is named,
        # its blobs are checked, and all are found whole.
        try:
            self._last_commit.write(head + 1, head)
        except OSError as error:
            self.logger.warning('could not note the end of a commit in '
                                'FILE.commit', extra={
                                    'file': self._last_commit.path,
                                    'error': _describe(error)})

    def _keep_ids(self, ids, with_blobs):
        """Write a commit's ids, and flush them (``with_blobs``: and the
        blobs, in one flush of the file system) before any of its lines is
        written: an entry in FILE must not lack its key, or a client that
        was not told of it would store it again.  Their offset in FILE.ids.
        """
        offset = self._ids.records * self._ids.record_size
        try:
            self._ids.write(ids)
        except OSError as error:
            self.logger.error('could not store the ids of idempotent writes',
                              extra={'file': self._ids.path,
                                     'error': _describe(error)})
            self._undo(None, offset, with_blobs)
            raise LogError('could not store the ids of idempotent writes: %s'
                           % _describe(error)) from None
        if not self.sync:
            return offset
        try:
            self._ids.flush(everything=with_blobs)
        except OSError as error:
            self._fail_flush(None, offset, with_blobs, error)
        return offset

    def _fail_flush(self, offset, ids_offset, discard, error):
        # After a failed flush the kernel may have dropped the data and
        # forgotten the error: a later flush would succeed without
        # covering it.  Only a restart is safe.
        self._undo(offset, ids_offset, discard)
        self.logger.critical(
            'could not flush the log; refusing writes until restart',
            extra={'file': self._file.path, 'error': _describe(error)})
        self._broken = LogError(
            'the log cannot be flushed (%s): it takes no writes until the '
            'server restarts' % _describe(error))
        raise self._broken from None

    def _undo(self, offset, ids_offset=None, discard=False):
        """Cut FILE back to offset, and FILE.ids to ids_offset; with
        ``discard``, remove the blobs just written, unflushed."""
        try:
            if offset is not None:
                self._file.truncate(offset)
            if ids_offset is not None:
                self._ids.undo(ids_offset, self.sync)
            if discard:
                self.blobs.discard_unflushed()
        except OSError as error:
            # Lines past the head that cannot be removed could come back as
            # entries at the next start: take no more writes.
            self.logger.critical(
                'could not undo a failed append; refusing writes until '
                'restart', extra={'file': self._file.path,
                                  'error': _describe(error)})
            self._broken = LogError(
                'the log could not be repaired (%s): it takes no writes until '
                'the server restarts' % _describe(error))

    def counts(self):
        """What the log has counted since it was opened: a dict of
        ``stored``, ``refused`` (``refuse_appends``) and ``failed``
        entries, ``commit_sizes``, ``commit_seconds`` and
        ``flush_seconds`` (of FILE's flush) as histogram snapshots (see
        ``_Histogram``), ``duplicates`` (entries not stored again, their
        key naming them), ``conflicts`` (refused: their key named another
        entry), ``keys`` (kept in memory), and ``broken``: why
        it takes no more writes, or None."""
        with self.appended:
            return {'stored': self._stored, 'refused': self._refused,
                    'failed': self._failed, 'duplicates': self._duplicates,
                    'conflicts': 0 if self._ids is None
                    else self._ids.conflicts,
                    'keys': 0 if self._ids is None
                    else len(self._ids.index_of),
                    'commit_sizes': self._commit_sizes.snapshot(),
                    'commit_seconds': self._commit_seconds.snapshot(),
                    'flush_seconds': self._flush_seconds.snapshot(),
                    'broken': None if self._broken is None
                    else str(self._broken)}

    def _remember(self, index, data):
        # Readers following the log ask for what was just appended, many
        # of them at once: they are served from memory, not from a file
        # each.  Under the lock; readers only ever get() from the dict.
        self._recent[index] = data
        self._recent_bytes += len(data)
        while (len(self._recent) > _RECENT_ENTRIES
               or self._recent_bytes > _RECENT_BYTES):
            self._recent_bytes -= len(self._recent.pop(self._recent_oldest))
            self._recent_oldest += 1

    def _call_on_append(self, entry):
        try:
            self.on_append(entry.index, parse_json(entry.data))
        except Exception:
            self.logger.exception('on_append failed',
                                  extra={'index': entry.index})

    # -- reading ------------------------------------------------------------

    def read(self, first, last, limit=math.inf):
        """Entries first..last, all at or below the head, as a list of
        ``(index, data)``: data is the entry's canonical JSON, or the
        ``Problem`` that keeps it from being read.  Fewer entries, at least
        one, once they add up to ``limit`` bytes."""
        size = self.line_size
        recent = self._recent
        raw = None
        entries = []
        total = 0
        for index in range(first, last + 1):
            if total >= limit:
                break
            data = recent.get(index)
            if data is None:
                if raw is None:
                    raw = self._file.read((first - 1) * size,
                                          (last - first + 1) * size)
                offset = (index - first) * size
                data, problem = self._checker.check(raw[offset:offset + size])
                if problem is not None:
                    self.logger.error('cannot read an entry', extra={
                        'index': index, 'error': problem.message})
                    entries.append((index, problem))
                    continue
            entries.append((index, data))
            total += len(data)
        return entries

    def name(self, index):
        """The hash that the line of entry ``index`` (at most the head)
        holds: its blob's name, if the line is whole."""
        line = self._file.read((index - 1) * self.line_size, self.line_size)
        return line[:-1].decode('ascii', 'replace')

    def keys(self, first, last):
        """The keys of entries first..last (at most the head) that have
        one, as ``{index: key}``."""
        if self._ids is None:
            return {}
        return self._ids.keys(first, last, self._lines)

    def wait_for(self, index, give_up):
        """Wait until entry ``index`` is durable, or ``give_up()`` is true.

        Whoever makes ``give_up()`` true calls ``wake``.
        """
        with self.appended:
            self.appended.wait_for(lambda: self.head >= index or give_up())

    def wake(self):
        """Wake every waiting reader, so each checks whether it should stop."""
        with self.appended:
            self.appended.notify_all()

    def close(self):
        if self._ids is not None:
            self._ids.close()
        if self._last_commit is not None:
            self._last_commit.close()
        self._file.close()
        self.blobs.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


_VERIFY_CHUNK = 1 << 14        # lines verify reads from the log at once
_VERIFY_SHARE = 256           # lines a thread checks at a time
# Threads verify reads blobs with.  On a cold cache, two reads in flight
# check blobs about 40% faster than one; more threads only fight over the
# interpreter lock, and slow a warm cache down.
_VERIFY_THREADS = 2


class Report:
    """What ``verify`` found: counts, and the first problems of each kind."""

    examples_kept = 5

    def __init__(self):
        self.entries = 0
        self.blobs = 0              # distinct blobs found (whole or not)
        self.unfinished = 0         # files left by blobs being written
        self.problems = {}          # kind -> how many entries have it
        self.examples = {}          # kind -> [(index, message)], the first

    def add(self, kind, index, message):
        self.problems[kind] = self.problems.get(kind, 0) + 1
        examples = self.examples.setdefault(kind, [])
        if len(examples) < self.examples_kept:
            examples.append((index, message))

    @property
    def ok(self):
        return not self.problems


def verify(path, blobs, hash_function=None, progress=None):
    """Check every entry of the log at ``path``; return a ``Report``.

    Each line must be a hash and a newline, and name a blob in ``blobs``
    that hashes to that name; each distinct blob is read once.  Files left
    by blobs being written when a process died are counted, not problems:
    no acknowledged entry is in one.  Nothing is written, so a server may
    be running on the same files; entries appended meanwhile are not
    checked.  ``progress(done, total)`` is called now and then.
    """
    checker = _EntryChecker(blobs, hash_function or sha256_hex)
    size = checker.line_size
    report = Report()
    whole = set()               # lines checked and found whole
    broken = {}                 # lines checked and found wanting -> problem

    def check(lines):
        return [(line, checker.check(line)[1]) for line in lines]
    with open(path, 'rb') as file, concurrent.futures.ThreadPoolExecutor(
            _VERIFY_THREADS) as pool:
        length = os.fstat(file.fileno()).st_size
        total = report.entries = length // size
        first = 1
        while first <= total:
            chunk = file.read(min(total - first + 1, _VERIFY_CHUNK) * size)
            lines = [chunk[offset:offset + size]
                     for offset in range(0, len(chunk) - size + 1, size)]
            if not lines:
                break               # cut short meanwhile: nothing more to see
            new = [line for line in dict.fromkeys(lines)
                   if line not in whole and line not in broken]
            shares = [new[start:start + _VERIFY_SHARE]
                      for start in range(0, len(new), _VERIFY_SHARE)]
            for share in pool.map(check, shares):
                for line, problem in share:
                    if problem is None:
                        whole.add(line)
                    else:
                        broken[line] = problem
            for index, line in enumerate(lines, first):
                problem = broken.get(line)
                if problem is not None:
                    report.add(problem.kind, index, problem.message)
            first += len(lines)
            if progress is not None:
                progress(first - 1, total)
        # A server appending meanwhile makes the size pass through values
        # that are not whole lines: only a size that stayed put is torn.
        if length % size and os.fstat(file.fileno()).st_size == length:
            report.add(TORN_LINE, total + 1,
                       'the last %d bytes are not a whole line'
                       % (length % size))
    report.blobs = len(whole) + sum(
        1 for problem in broken.values()
        if problem.kind in (WRONG_BLOB, UNREADABLE_BLOB))
    report.unfinished = len(blobs.unfinished())
    return report


def _describe(error):
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or type(error).__name__


# ============================================================================
# Connections
# ============================================================================

_RECEIVE_SIZE = 1 << 16
_LINGER_SECONDS = 1.0         # seconds to drain input after a last error

# A peer's TCP end without TLS's close_notify is the end of its input, as it
# is without TLS: a client that half-closes still gets its replies.  (By
# default OpenSSL 3 takes it for an error, after which nothing more can be
# sent on the connection.)
_IGNORE_UNEXPECTED_EOF = getattr(ssl, 'OP_IGNORE_UNEXPECTED_EOF', (
    0x80 if ssl.OPENSSL_VERSION_INFO >= (3,) else 0))     # Python 3.9


def server_tls_context(cert, key, ca=None):
    """An ``ssl.SSLContext`` for a Server: TLS 1.2 or newer, serving the
    certificate chain in ``cert`` (PEM) with its private ``key``.  With
    ``ca`` (PEM), clients must present a certificate it signed."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= _IGNORE_UNEXPECTED_EOF
    # A renegotiation would make a send wait on a receive.  (OpenSSL 3
    # refuses it anyway; older versions may not.)
    context.options |= getattr(ssl, 'OP_NO_RENEGOTIATION', 0)
    context.load_cert_chain(cert, key)
    if ca:
        context.load_verify_locations(ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_tls_context(ca=None, cert=None, key=None):
    """An ``ssl.SSLContext`` for a Client: TLS 1.2 or newer, checking the
    server's certificate against ``ca`` (PEM; by default the system's CA
    certificates) and its name against the host connected to.  With
    ``cert`` (PEM, and its ``key``), it presents that client certificate.
    """
    context = ssl.create_default_context(cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= _IGNORE_UNEXPECTED_EOF
    if cert:
        context.load_cert_chain(cert, key)
    return context


class _TLSSocket:
    """A TLS connection one thread may receive on while another sends.

    OpenSSL forbids using one connection from two threads at once, and the
    protocol needs just that: a read streams entries out while writes come
    in.  So every TLS call is made under a lock, on a non-blocking socket,
    and waiting for the socket happens outside the lock: a receive waiting
    for data never holds up a send.  The methods are those of a socket that
    the server and the client use; timeouts work as a socket's.
    """

    def __init__(self, sock):
        self._sock = sock               # an ssl.SSLSocket
        self._timeout = sock.gettimeout()
        sock.setblocking(False)
        self._tls_lock = threading.Lock()       # one TLS call at a time
        self._send_lock = threading.Lock()      # one send, retries and all

    def handshake(self, timeout):
        self._call(self._sock.do_handshake,
                   None if timeout is None else time.monotonic() + timeout)

    def recv(self, size):
        return self._call(self._sock.recv, self._deadline(), size)

    def recv_into(self, buffer):
        return self._call(self._sock.recv_into, self._deadline(), buffer)

    def sendall(self, data):
        deadline = self._deadline()
        with self._send_lock:
            view = memoryview(data).cast('B')
            while view:
                view = view[self._call(self._sock.send, deadline, view):]

    def _deadline(self):
        if self._timeout is None:
            return None
        return time.monotonic() + self._timeout

    def _call(self, method, deadline, *args):
        """method(*args), under the lock, retried as the socket is ready.

        A call that must wait is retried with the same arguments, as
        OpenSSL requires of a write."""
        while True:
            with self._tls_lock:
                try:
                    return method(*args)
                except ssl.SSLWantReadError:
                    event = select.POLLIN
                except ssl.SSLWantWriteError:
                    event = select.POLLOUT
            poll = select.poll()        # select() fails on a descriptor
            poll.register(self._sock, event)    # above 1023
            wait = None if deadline is None \
                else max(0.0, deadline - time.monotonic()) * 1000
            if not poll.poll(wait):
                raise socket.timeout('timed out')  # noqa: UP041 -- 3.9

    def close_notify(self):
        """End TLS properly: send close_notify, without waiting for the
        peer's (a peer gone already is no error)."""
        with self._tls_lock:
            try:
                self._sock.unwrap()
            except (ssl.SSLWantReadError, ssl.SSLWantWriteError, OSError,
                    ValueError):
                pass

    def shutdown(self, how):
        # At the socket's level: SSLSocket.shutdown would drop TLS, and a
        # later send would go out in the clear.
        socket.socket.shutdown(self._sock, how)

    @property
    def socket(self):
        """The SSLSocket, for socket.socket's own methods below TLS."""
        return self._sock

    def makefile(self, mode='rb', buffering=-1):
        return io.BufferedReader(_Receiver(self), buffering if buffering > 0
                                 else io.DEFAULT_BUFFER_SIZE)

    def settimeout(self, timeout):
        self._timeout = timeout

    def gettimeout(self):
        return self._timeout

    def setsockopt(self, *args):
        self._sock.setsockopt(*args)

    def getsockopt(self, *args):
        return self._sock.getsockopt(*args)

    def fileno(self):
        return self._sock.fileno()

    def getpeername(self):
        return self._sock.getpeername()

    def getpeercert(self):
        return self._sock.getpeercert()

    def version(self):
        return self._sock.version()

    def close(self):
        with self._tls_lock:        # not in the middle of another's call
            self._sock.close()


class _Receiver(io.RawIOBase):
    """What a _TLSSocket receives, as a raw stream to buffer."""

    def __init__(self, connection):
        super().__init__()
        self._connection = connection

    def readable(self):
        return True

    def readinto(self, buffer):
        return self._connection.recv_into(buffer)


def _certificate_subject(certificate):
    """The name in a peer's certificate, as getpeercert gives it: its
    commonName, or else its first subjectAltName."""
    certificate = certificate or {}
    for part in certificate.get('subject', ()):
        for key, value in part:
            if key == 'commonName':
                return value
    for _, value in certificate.get('subjectAltName', ()):
        return value
    return None


def _certificate_names(certificate):
    """Every name a peer's certificate gives: its commonName and its DNS
    subjectAltNames."""
    certificate = certificate or {}
    names = {value for part in certificate.get('subject', ())
             for key, value in part if key == 'commonName'}
    names.update(value for kind, value in certificate.get('subjectAltName',
                                                          ())
                 if kind == 'DNS')
    return names


def _send_without_blocking(connection, data):
    """Send data into a new connection's empty send buffer, or not at all
    (in the accepting thread, which must not block)."""
    try:
        connection.setblocking(False)
        connection.send(data)
    except OSError:
        pass


def _shutdown(connection, how=socket.SHUT_RDWR):
    """Shut a connection down, if it is still there.

    The default ends it at once, waking any thread blocked sending on it.
    """
    try:
        connection.shutdown(how)
    except OSError:
        pass


def _remote(client_address):
    return '%s:%s' % client_address[:2]


def _linger(connection):
    """End our side, then drain (briefly) what the peer still sends.

    Closing with unread input makes the kernel send a reset, which can
    destroy our last line (or TLS alert) before the peer reads it.  Bytes
    are drained below TLS: nothing more is read as messages.
    """
    if isinstance(connection, _TLSSocket):
        connection.close_notify()       # TLS's own end, after our last line
        connection = connection.socket
    deadline = time.monotonic() + _LINGER_SECONDS
    try:
        socket.socket.shutdown(connection, socket.SHUT_WR)
        while time.monotonic() < deadline:
            socket.socket.settimeout(connection, deadline - time.monotonic())
            if not socket.socket.recv(connection, _RECEIVE_SIZE):
                break
    except OSError:
        pass


def _refused_by_tls(error):
    """Whether error is a TLS peer's refusal (a certificate it does not
    accept, say), which trying again will not change."""
    return isinstance(error, ssl.SSLError) and not isinstance(
        error, (ssl.SSLEOFError, ssl.SSLZeroReturnError))


# ============================================================================
# Server
# ============================================================================

# -- what the server sends: every message, encoded here and only here -------

_INVALID_JSON = b'{"error":"invalid JSON"}\n'
_TOO_LARGE = b'{"error":"message too large"}\n'
_TOO_MANY = b'{"error":"too many connections"}\n'
_INVALID_MESSAGE = b'{"error":"invalid message"}\n'
_ALREADY_READING = b'{"error":"already reading"}\n'
_CURRENT = b'{"current":true}\n'
_NOT_ALLOWED = 'not allowed to append'
# To a follower that introduced itself with its read: report what you hold.
_REPORTS = b'{"reports":true}\n'


def _acknowledgement(id, result):
    """The reply to a write: its index, or why it is not in the log."""
    if type(result) is int:
        return b'{"id":%s,"index":%d}\n' % (canonical_json(id), result)
    if type(result) is Duplicate:
        return b'{"id":%s,"index":%d,"duplicate":true}\n' % (
            canonical_json(id), result)
    return b'{"id":%s,"error":%s}\n' % (canonical_json(id),
                                        canonical_json(str(result)))


def _idempotence_line(window):
    """The answer to a client that asks whether the server keeps the ids
    of idempotent writes: for how many entries (0: it does not)."""
    return b'{"idempotence":%d}\n' % window


def _replies(replies, results):
    """The replies due, as one send: each bytes, or the id of a write,
    acknowledged with the next of results."""
    results = iter(results)
    return b''.join([reply if type(reply) is bytes
                     else _acknowledgement(reply, next(results))
                     for reply in replies])


_ENTRY_LINE = b'{"index":%d,"entry":%s}\n'
_KEYED_ENTRY_LINE = b'{"index":%d,"key":"%s","entry":%s}\n'


def _entry_lines(entries, keys=None):
    """Entries as ``Log.read`` gives them, as the lines of a read; with
    ``keys`` (``{index: key}``), each entry that has a key with it."""
    if keys:
        return b''.join([
            _KEYED_ENTRY_LINE % (index, keys[index].hex().encode('ascii'),
                                 data)
            if index in keys and type(data) is bytes
            else _entry_lines([(index, data)]) for index, data in entries])
    try:
        # The hot path of every read: a Problem, which is no bytes, fails
        # it (rarely), rather than a test of every entry slowing it down.
        # One entry, as tailing readers are pushed, costs no list.
        if len(entries) == 1:
            return _ENTRY_LINE % entries[0]
        return b''.join([_ENTRY_LINE % entry for entry in entries])
    except TypeError:
        return b''.join([
            b'{"index":%d,"error":%s}\n' % (index,
                                            canonical_json(data.message))
            if type(data) is Problem else _ENTRY_LINE % (index, data)
            for index, data in entries])


class _EncodedLines:
    """The lines of the latest entries as reads send them, each encoded
    once, by the first read to send it, for every other: a hundred
    readers that tail the log share one encoding of each entry."""

    KEPT = 4096                 # entries, the latest

    def __init__(self):
        self._lines = {}        # index -> line, oldest first
        self._lock = threading.Lock()

    def of(self, entries, head):
        """``_entry_lines(entries)``, as many as can be from those kept.
        Entries far from ``head`` (a read catching up) are encoded, not
        kept: they would push out those that the readers at the head
        share."""
        if entries[0][0] <= head - self.KEPT:
            return _entry_lines(entries)
        lines = self._lines
        found = []
        for entry in entries:
            line = lines.get(entry[0])
            if line is None:
                line = _entry_lines([entry])
                if type(entry[1]) is bytes:    # a read error may pass
                    self._keep(entry[0], line)
            found.append(line)
        return found[0] if len(found) == 1 else b''.join(found)

    def _keep(self, index, line):
        with self._lock:
            lines = self._lines
            lines[index] = line
            while len(lines) > self.KEPT:
                del lines[next(iter(lines))]


def _head_line(head):
    return b'{"head":%d}\n' % head


# -- what the server accepts --------------------------------------------------

def _is_positive_integer(value):
    # JSON numbers are judged as JavaScript judges them: 1.0 is the integer
    # 1, booleans are not numbers, and an integer literal too large for a
    # double (a BigInt among them) is Infinity, which is not an integer.
    kind = type(value)
    if kind is int:
        try:
            float(value)
        except OverflowError:
            return False
        return value >= 1
    return kind is float and value >= 1 and value.is_integer()


def _is_read(message):
    return (type(message) is dict
            and _is_positive_integer(message.get('from'))
            and _is_positive_integer(message.get('read')))


def _is_write(message):
    if type(message) is not dict or 'entry' not in message:
        return False
    id, entry = message.get('id'), message['entry']
    return (type(id) is str and id != ''
            and (entry is None or type(entry) in (dict, list)))


def _asks_idempotence(message):
    return type(message) is dict and message.get('ask') == 'idempotence'


def _id_key(id):
    """The key an idempotent write's id is kept by: its digest."""
    return hashlib.blake2b(id.encode('utf-8', 'surrogatepass'),
                           digest_size=KEY_SIZE).digest()


def _is_report(message):
    # A follower's: the entries it holds durably, 1 to durable.
    if type(message) is not dict:
        return False
    durable = message.get('durable')
    return type(durable) is int and durable >= 0


class _LineSplitter:
    """Cuts a stream of bytes into lines of at most ``limit`` bytes.

    ``feed`` takes what arrived and returns the lines it completes, without
    their newlines; ``end``, at the end of the stream, returns the last
    line if it had no newline.  A line longer than the limit is found as
    soon as that much of it has arrived, so a line never holds more memory
    than that: ``too_long`` turns true, ``feed`` returns the lines before
    it, and nothing after.
    """

    def __init__(self, limit):
        self.limit = limit
        self.too_long = False
        self._partial = []          # the start of a line still arriving
        self._length = 0            # ... and its length

    def feed(self, chunk):
        if self.too_long:
            return []
        limit = self.limit
        lines = chunk.split(b'\n')
        if self._length + len(lines[0]) > limit:
            self.too_long = True
            return []
        if len(lines) == 1:
            self._partial.append(chunk)
            self._length += len(chunk)
            return []
        if self._partial:
            self._partial.append(lines[0])
            lines[0] = b''.join(self._partial)
        tail = lines.pop()
        self._partial = [tail] if tail else []
        self._length = len(tail)
        # Any other line lies within the chunk: no longer than it.
        if len(chunk) > limit and (self._length > limit
                                   or max(map(len, lines)) > limit):
            self.too_long = True
            return list(itertools.takewhile(
                lambda line: len(line) <= limit, lines))
        return lines

    def end(self):
        if self.too_long or not self._partial:
            return []
        return [b''.join(self._partial)]


_READ_CHUNK = 256             # entries read from storage and sent at once
_READ_CHUNK_BYTES = 1 << 20   # ... or fewer, once they hold this many bytes
_READ_STOP_GRACE = 2.0        # seconds a read may take to end, but at a stop
_ACCEPT_PAUSE = 0.1           # seconds to wait when out of descriptors


class _Read(threading.Thread):
    """One read on a connection, in a thread of its own.

    A read goes through three phases:

    1. catch up: send entries from ``from`` to the head, a chunk at a time;
    2. at the head, send ``{"current":true}`` once;
    3. wait on the log's Condition and send each entry as it becomes durable,
       until ``read`` entries have been sent; then call ``finished``, which
       ends the read with ``{"head":H}``.  Given a ``pusher``, it waits
       there instead, which sends it the entries (see ``_Pusher``), until
       it hands the read back to this thread.

    Entries are sent by index, so none is sent twice, whenever it arrived.
    A read knows nothing of its connection but ``send`` (whole lines out)
    and ``unacknowledged`` (the connection's writes not yet acknowledged,
    whose entries it holds back), and nothing of the server but its
    ``stopping`` (true once it stops).  It can be ended early: ``drain``
    lets it send what the log holds and end at the head (the client has
    stopped sending); ``stop`` ends it before it sends anything more (the
    connection is gone, or closing).
    """

    def __init__(self, log, start, count, send, unacknowledged, finished,
                 server, name='read', sent=None, keys=False, lines=None,
                 pusher=None, connection=None):
        super().__init__(name=name, daemon=True)
        self.log = log
        self.keys = keys            # entries go with their keys
        # The lines of the latest entries, shared with the other reads.
        self._lines = lines or _EncodedLines()
        # With a pusher, the connection's try_send and finish_send; what
        # the pusher sent up to (index), and the bytes left to send.
        self._pusher, self._connection = pusher, connection
        self.index = self._rest = None
        self._back = threading.Event()
        self._sent = sent or _Counter()     # entries sent, for monitoring
        self.start_index, self.count = start, count
        self._send, self._unacknowledged = send, unacknowledged
        # Only its stopping attribute is read: every entry pushed checks
        # it, and an attribute costs less than a call.
        self._finished, self._server = finished, server
        self._ending = None             # None, 'drain' or 'stop'

    def run(self):
        # Every entry pushed to a tailing reader goes round this loop, a
        # hundred readers at once: what it uses is looked up once, here.
        log, send, server = self.log, self._send, self._server
        unacknowledged, sent = self._unacknowledged, self._sent
        encoded = self._lines.of
        index, end = self.start_index, self.start_index + self.count
        current = False
        try:
            while index < end:
                if self._ending == 'stop' or server.stopping:
                    return
                head = log.head
                if index > head:                          # phase 2, then 3
                    if not current:
                        send(_CURRENT)
                        current = True
                    if self._ending is not None:
                        return
                    if self._pusher is not None:
                        index = self._parked(index)
                    else:
                        log.wait_for(index, self._should_end)
                    continue
                last = min(head, end - 1, index + _READ_CHUNK - 1)  # phase 1
                entries = log.read(index, last, _READ_CHUNK_BYTES)
                if self._ending == 'stop':
                    return
                index += len(entries)
                # Nothing to wait for, nearly always: the check is inline,
                # and without the lock (see _Unacknowledged.begin).
                after = unacknowledged.after
                if after is not None and index - 1 > after:
                    unacknowledged.wait(index - 1)
                if self.keys:
                    send(_entry_lines(entries, log.keys(entries[0][0],
                                                        index - 1)))
                else:
                    send(encoded(entries, head))
                sent.add(len(entries))
            if self._ending != 'stop':
                self._finished()
        except OSError:
            pass            # the connection is gone; the handler sees it too

    def _should_end(self):
        return self._ending is not None or self._server.stopping

    def _parked(self, index):
        """Wait with the pusher, which sends entries from index on, until
        it hands the read back; the index to go on from."""
        self.index = index
        self._back.clear()
        if not self._pusher.park(self):
            self._pusher = None     # it has stopped, or this read ends
            return index
        self._back.wait()
        rest, self._rest = self._rest, None
        if rest is not None:
            self._connection.finish_send(rest)
        return self.index

    def push(self, head, shared):
        """In the pusher's thread: send the entries up to head, without
        blocking.  True if all were sent and the read may stay parked.
        ``shared`` holds, by range, the entries read and encoded for other
        reads of this commit."""
        if self._ending is not None or self._server.stopping:
            return False
        index = self.index
        last = min(head, self.start_index + self.count - 1,
                   index + _READ_CHUNK - 1)
        found = shared.get((index, last))
        if found is None:
            entries = self.log.read(index, last, _READ_CHUNK_BYTES)
            found = shared[index, last] = (
                len(entries), self._lines.of(entries, head))
        count, data = found
        after = self._unacknowledged.after
        if after is not None and index + count - 1 > after:
            return False            # held back: its thread waits for that
        sent = self._connection.try_send(data, self)
        if sent == 0:
            return False            # its thread sends them, blocking
        self.index = index + count
        self._sent.add(count)
        if sent < len(data):
            self._rest = data[sent:]    # its thread sends these first
            return False
        return self.index < self.start_index + self.count

    def resume(self):
        """Hand the read back to its own thread."""
        self._back.set()

    def drain(self):
        self._end('drain')

    def stop(self):
        self._end('stop')

    def _end(self, how):
        self._ending = how
        if self._pusher is not None and self._pusher.unpark(self):
            self.resume()
        self.log.wake()


class _Pusher(threading.Thread):
    """Sends new entries to the reads waiting at the head of the log, all
    from this one thread: the reads that tail the log, a hundred or more.

    Each read waiting on the log's Condition in a thread of its own, every
    commit woke every such thread, one after another: with 100 reads and a
    thousand commits a second that took all the interpreter's time the
    server had.  So a read at the head parks here instead; this thread is
    the one that waits on the Condition, and at each commit sends every
    parked read its new entries, read and encoded once for all the reads
    at the same index, without blocking.  It hands a read back to its own
    thread (``_Read.resume``) when it cannot send all at once (the client
    reads slowly, or the connection is sending replies), when the
    connection's own writes wait for their acknowledgement, when the read
    has sent all it asked for, and when it ends or the server stops.
    """

    def __init__(self, log, server):
        super().__init__(name='pusher', daemon=True)
        self.log, self._server = log, server
        self._parked = set()
        self._lock = threading.Lock()
        self._running = True

    def park(self, read):
        """Take a read whose ``index`` is past the head; False if the read
        is ending, or this thread has stopped."""
        with self._lock:
            if not self._running or read._ending is not None:
                return False
            self._parked.add(read)
        self.log.wake()
        return True

    def unpark(self, read):
        """Take a parked read out: True if it was parked."""
        with self._lock:
            if read in self._parked:
                self._parked.discard(read)
                return True
            return False

    def _due(self, head):
        with self._lock:
            return any(read.index <= head for read in self._parked)

    def run(self):
        log, server = self.log, self._server
        try:
            while True:
                with log.appended:
                    log.appended.wait_for(
                        lambda: server.stopping or self._due(log.head))
                if server.stopping:
                    return
                head = log.head
                with self._lock:
                    due = [read for read in self._parked
                           if read.index <= head]
                    self._parked.difference_update(due)
                shared = {}
                for read in due:
                    try:
                        parked = read.push(head, shared)
                    except Exception:   # a bug: its own thread goes on
                        log.logger.exception('could not push entries to a '
                                             'read')
                        parked = False
                    with self._lock:
                        # An end that came meanwhile found it unparked.
                        parked = parked and read._ending is None
                        if parked:
                            self._parked.add(read)
                    if not parked:
                        read.resume()
        finally:
            with self._lock:
                self._running = False
                reads, self._parked = self._parked, set()
            for read in reads:
                read.resume()


class Handler(socketserver.StreamRequestHandler):
    """Serves one connection: reads lines, answers them in order.

    Lines that arrive together are handled together: their writes go into
    the log together (in one commit, up to its size) and their replies out
    as one send, but for a read among them, before which the writes sent
    earlier are stored and answered.  Each read runs in a thread of its
    own, so that a connection can read and write at once.

    Methods a subclass may override, calling this class's own:

    ``setup()``, ``handle()``, ``finish()``
        socketserver's: set the connection up, serve it, end it.
    ``handle_lines(lines)``
        Act on the complete lines (bytes, without newlines) that arrived
        together; return False to close the connection.
    ``handle_read(message)``, ``handle_write(message)``
        A valid read or write message, parsed.
    ``handle_report(message)``
        A follower's report of the entries it holds (see ``_Replicas``).
    ``handle_invalid(message)``
        Any other JSON value.
    ``send(data)``
        Send whole lines, never between the lines of another send.
    """

    disable_nagle_algorithm = True
    wbufsize = 0

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.connection_id = self.server.next_connection_id()
        self.logger = self.server.logger
        self.debug = self.logger.isEnabledFor(logging.DEBUG)
        # Not an RLock: the pusher's thread may leave it to a read's to
        # release (see try_send).  The thread that holds it, if any.
        self._send_lock = threading.Lock()
        self._send_owner = None
        self._unacknowledged = _Unacknowledged()
        self._read = None               # the _Read in progress, if any
        self._reads = []                # ... and those still ending
        # Replies due, in order: bytes, or the id (a str) of a write that
        # awaits its index; and the entries of those writes, in order.
        self._replies = []
        self._writes = []
        self._keys = None               # ... and their keys, once one has
        self._acknowledger = None       # with sync_replicas, once it writes
        self.counts = {'writes': 0, 'reads': 0, 'invalid': 0}
        self.role = self.server.role(self.connection)
        # The name of the follower this connection is, once it introduced
        # itself; and what reads see: the log's confirmed entries, but a
        # follower's reads, which must see what is to be confirmed.
        self.follower = None
        self._view = self.server.readable

    def handle(self):
        self.logger.info('connection opened', extra=self._description())
        splitter = _LineSplitter(self.server.max_line)
        reason = None
        received = self.server.counted.bytes_received
        try:
            while True:
                chunk = self.rfile.read1(_RECEIVE_SIZE)
                received.add(len(chunk))
                # No chunk: the end of input, by a half-close or a close.
                lines = splitter.feed(chunk) if chunk else splitter.end()
                if not self.handle_lines(lines):
                    reason = 'invalid JSON'
                    break
                if splitter.too_long:
                    self._end_with_error(
                        _TOO_LARGE, 'message too large; closing the '
                        'connection', limit=self.server.max_line)
                    reason = 'message too large'
                    break
                if not chunk:
                    break
        except OSError as error:
            reason = _describe(error)
        except _Unconfirmed as error:
            reason = str(error)
        finally:
            try:
                self._finish_acknowledging()
            except _Unconfirmed as error:
                reason = str(error)
            if self.follower is not None:
                self.server.replicas.leave(self.follower, self.connection_id)
            # Input is over.  A client that stopped sending still gets what
            # its read can send without waiting; otherwise the read stops.
            if reason is None and self.server.stopping:
                reason = 'server stopping'
            self._end_read(drain=reason is None)
            if reason in ('invalid JSON', 'message too large'):
                _linger(self.connection)
            self.logger.info('connection closed', extra=dict(
                self.counts, connection=self.connection_id,
                reason=reason or 'closed by client'))

    def _description(self):
        """The connection, for its 'connection opened' record."""
        description = {'connection': self.connection_id,
                       'remote': _remote(self.client_address),
                       'role': self.role}
        if isinstance(self.connection, _TLSSocket):
            description['tls'] = self.connection.version()
            subject = self._certificate()
            if subject is not None:
                description['certificate'] = subject
        return description

    def _certificate(self):
        """The subject of the client's certificate, or None."""
        if not isinstance(self.connection, _TLSSocket):
            return None
        return _certificate_subject(self.connection.getpeercert())

    def handle_lines(self, lines):
        """Act on lines in order; False when the connection must close."""
        for line in lines:
            if not line.strip(_JSON_SPACE):
                continue
            try:
                message = parse_json(line)
            except (ValueError, RecursionError):
                self.counts['invalid'] += 1
                self._end_with_error(_INVALID_JSON,
                                     'invalid JSON; closing the connection')
                return False
            if self.debug:
                self.logger.debug('message', extra={
                    'connection': self.connection_id,
                    'line': line.decode('utf-8')})
            if _is_read(message):
                self._send_replies()    # writes sent before a read land first
                self.handle_read(message)
            elif _is_write(message):
                self.handle_write(message)
            elif self.follower is not None and _is_report(message):
                self.handle_report(message)
            elif _asks_idempotence(message):
                self._replies.append(_idempotence_line(
                    self.server.log.idempotence_window))
            else:
                self.handle_invalid(message)
        self._send_replies()
        return True

    def handle_read(self, message):
        if self._read is not None:
            self._replies.append(_ALREADY_READING)
            return
        self.counts['reads'] += 1
        self.server.counted.reads.add()
        stopping = self.server
        if 'follower' in message and self.counts['reads'] == 1:
            stopping = self._introduce(message['follower'])
        keys = message.get('ids') is True
        # The plain reads of the log, over TCP without TLS, wait with the
        # pusher; a follower's, one with keys, or one whose lines a
        # subclass's send must see, in their own thread.
        pushed = (self._view is self.server.log and stopping is self.server
                  and not keys and type(self.connection) is socket.socket
                  and type(self).send is Handler.send)
        self._read = _Read(
            self._view, int(message['from']), int(message['read']),
            self.send, self._unacknowledged, self._read_finished,
            stopping, name='read-%s' % self.connection_id,
            sent=self.server.counted.entries_sent, keys=keys,
            lines=self.server.encoded_lines,
            pusher=self.server.pusher() if pushed else None,
            connection=self)
        # One that has finished may still be sending its head line.
        self._reads = [read for read in self._reads if read.is_alive()]
        self._reads.append(self._read)
        self._read.start()

    def _introduce(self, name):
        """A follower's first read names it: if it may report, ask it to
        report, and let its reads see every durable entry.  Returns what
        the read is to watch for the stop: the server, or for a follower
        that reports, the replicas, which let it go later (see
        ``Server.server_close``)."""
        if type(name) is not str or not name:
            return self.server
        if self.role != 'appender':
            # A reader could otherwise confirm writes it never stored.
            self.logger.warning(
                'a follower may not report: its certificate may not append; '
                'it follows as a reader', extra={
                    'connection': self.connection_id, 'follower': name,
                    'certificate': self._certificate()})
            return self.server
        self.follower = name
        self._view = self.server.log
        self.server.connections.mark_follower(self.connection)
        self.server.replicas.join(name, self.connection_id)
        self.send(_REPORTS)
        return self.server.replicas

    def handle_report(self, message):
        self.server.replicas.report(self.follower, self.connection_id,
                                    message['durable'])

    def handle_write(self, message):
        if self.role != 'appender':
            self.counts['writes'] += 1
            self.server.counted.refused_writes['not allowed'].add()
            self._replies.append(_acknowledgement(message['id'],
                                                  _NOT_ALLOWED))
            self.server.refused_write(self.connection_id, self._certificate())
            return
        try:
            data = canonical_json(message['entry'])
        except ValueError as error:     # too deep, or a number too large
            self.counts['writes'] += 1
            self.server.counted.refused_writes['invalid entry'].add()
            self._replies.append(_acknowledgement(message['id'], error))
            return
        if message.get('idempotent') is True \
                and self.server.log.idempotence_window:
            if self._keys is None:
                self._keys = [None] * len(self._writes)
            self._keys.append(_id_key(message['id']))
        elif self._keys is not None:
            self._keys.append(None)
        self._writes.append(data)
        self._replies.append(message['id'])

    def handle_invalid(self, message):
        self.counts['invalid'] += 1
        self._replies.append(_INVALID_MESSAGE)

    def _send_replies(self):
        """Append the writes received, then send every reply due."""
        if not self._replies:
            return
        writes, self._writes = self._writes, []
        keys, self._keys = self._keys, None
        replies, self._replies = self._replies, []
        if self.server.replicas.required and (writes or self._acknowledger):
            self._send_when_confirmed(writes, keys, replies)
            return
        if not writes:
            self.send(b''.join(replies))
            return
        # A read in progress holds these writes' entries back until their
        # acknowledgements are out.  With none, none can start before this
        # returns: reads are started by this thread.
        holding = self._read is not None
        if holding:
            self._unacknowledged.begin(self.server.log.head)
        try:
            results = self.server.log.append(writes, keys)
            self.counts['writes'] += len(writes)
            self.send(_replies(replies, results))
        finally:
            if holding:
                self._unacknowledged.end()

    def _send_when_confirmed(self, writes, keys, replies):
        """Append the writes, and leave their replies to the acknowledger,
        which sends them once the followers confirm the writes: meanwhile
        this goes on with the lines that follow."""
        if self._acknowledger is None:
            self._acknowledger = _Acknowledger(
                self.server.replicas, self.send, self._unacknowledged,
                'acknowledge-%s' % self.connection_id)
        results = []
        if writes:
            # Whenever a read starts, it holds these entries back until
            # their acknowledgements are out.
            self._unacknowledged.begin(self.server.log.head)
            results = self.server.log.append(writes, keys)
            self.counts['writes'] += len(writes)
        self._acknowledger.put(replies, results, holding=bool(writes))

    def _finish_acknowledging(self):
        """Wait until the acknowledger has sent every reply due."""
        if self._acknowledger is not None:
            acknowledger, self._acknowledger = self._acknowledger, None
            acknowledger.finish()

    def _end_with_error(self, error, why, **context):
        """Answer what came before, then send error as the last line."""
        self._send_replies()
        self._finish_acknowledging()
        self._end_read(drain=False)
        self.send(error)
        self.logger.warning(why, extra=dict(context,
                                            connection=self.connection_id))

    def send(self, data):
        """Send whole lines; the lock keeps lines of reads and writes apart."""
        if self._send_owner == threading.get_ident():
            self._send_locked(data)         # held already, by this thread
            return
        with self._send_lock:
            self._send_locked(data)

    def _send_locked(self, data):
        self.wfile.write(data)
        self.server.counted.bytes_sent.add(len(data))

    def try_send(self, data, then):
        """Send whole lines now, without blocking, from the pusher's thread:
        how many bytes were sent.  If some but not all, the lock stays
        held, the thread ``then`` its holder, for ``finish_send`` in that
        thread to send the rest: no other line may come between."""
        if not self._send_lock.acquire(blocking=False):
            return 0                # replies are being sent
        try:
            sent = self.connection.send(data, socket.MSG_DONTWAIT)
        except OSError:             # full, or gone: the read's thread sees
            sent = 0
        if sent == len(data) or sent == 0:
            self._send_lock.release()
        else:
            self._send_owner = then.ident
        self.server.counted.bytes_sent.add(sent)
        return sent

    def finish_send(self, rest):
        """Send what try_send left, then let other lines go."""
        try:
            self._send_locked(rest)
        finally:
            self._send_owner = None
            self._send_lock.release()

    def _read_finished(self):
        """The read has sent every entry it asked for: end it."""
        head = self._unacknowledged.head(self._view.head)
        with self._send_lock:
            # Over before the client can know it: a read sent right after
            # this head is never refused as "already reading", and sends
            # nothing before it.
            self._send_owner = threading.get_ident()
            try:
                self._read = None
                self.send(_head_line(head))
            finally:
                self._send_owner = None

    def _end_read(self, drain):
        """End the read in progress, if any, with ``drain`` once it has
        sent what the log holds; and wait for those still ending."""
        reads, self._reads = self._reads, []
        for read in reads:
            self._end_one_read(read, drain)
        self._read = None

    def _end_one_read(self, read, drain):
        if drain:
            read.drain()
            while read.is_alive() and not self.server.stopping:
                read.join(_READ_STOP_GRACE)
        read.stop()
        if self.server.stopping:
            # A read blocked sending to a client that does not read is cut
            # off by server_close, after its stop_timeout.
            read.join()
        else:
            read.join(_READ_STOP_GRACE)
            if read.is_alive():
                # Blocked sending to a client that does not read: cut it off.
                _shutdown(self.connection)
                read.join()


class _Unacknowledged:
    """A connection's writes from their append to their acknowledgement.

    So that a client learns an entry's index before it reads the entry,
    the connection's read holds back entries above ``after`` (the head
    before the oldest batch of writes not yet acknowledged), and its head
    line counts none of them, until the acknowledgements have been sent.
    Batches begin and end in order (more than one is in flight only with
    the acknowledger).
    """

    def __init__(self):
        self.after = None           # None: no write awaits acknowledgement
        self._heads = collections.deque()   # before each batch in flight
        self._changed = threading.Condition()

    def begin(self, head):
        # Before the append: an entry of these writes, once a read sees it
        # in the log, comes after this, so the read sees after set too.
        with self._changed:
            self._heads.append(head)
            self.after = self._heads[0]

    def end(self):
        """The oldest batch in flight is acknowledged."""
        with self._changed:
            self._heads.popleft()
            self.after = self._heads[0] if self._heads else None
            self._changed.notify_all()

    def wait(self, last):
        """Wait until entries up to ``last`` may be sent."""
        with self._changed:
            self._changed.wait_for(
                lambda: self.after is None or last <= self.after)

    def head(self, head):
        """The head to tell the connection: none of the writes counted."""
        with self._changed:
            return head if self.after is None else min(head, self.after)


# Batches of replies a connection may have waiting for the followers before
# it takes no more of its input: a client that sends on regardless is held
# back by TCP, not by memory.
_WAITING_BATCHES = 16


class _Acknowledger(threading.Thread):
    """Sends a connection's replies, with sync_replicas, in order: each
    batch once the followers have confirmed its writes.

    The connection goes on receiving and appending meanwhile, so that the
    commit of one batch here and the followers' copy of the one before
    overlap, as they could not if the connection waited.  If the server
    stops before the followers confirm a write, the replies before it are
    sent, and ``finish`` raises ``_Unconfirmed``.
    """

    def __init__(self, replicas, send, unacknowledged, name):
        super().__init__(name=name, daemon=True)
        self._replicas = replicas
        self._send, self._unacknowledged = send, unacknowledged
        self._batches = collections.deque()   # (replies, results, holding)
        self._changed = threading.Condition(threading.Lock())
        self._ending = False
        self._failed = None         # _Unconfirmed, or the OSError of a send
        self.start()

    def put(self, replies, results, holding):
        """Replies to send once the writes with these results are
        confirmed (holding: they began in the unacknowledged)."""
        with self._changed:
            self._changed.wait_for(
                lambda: len(self._batches) < _WAITING_BATCHES
                or self._failed is not None)
            if self._failed is None:
                self._batches.append((replies, results, holding))
                self._changed.notify_all()
                return
        if holding:
            self._unacknowledged.end()
        raise self._failed

    def run(self):
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._batches
                                       or self._ending)
                if not self._batches:
                    return
                replies, results, holding = self._batches[0]
            try:
                self._acknowledge(replies, results)
            except (OSError, _Unconfirmed) as error:
                self._fail(error)
                return
            finally:
                if holding:
                    self._unacknowledged.end()
            with self._changed:
                self._batches.popleft()
                self._changed.notify_all()

    def _acknowledge(self, replies, results):
        # A duplicate too waits until its entry is confirmed.
        last = max((result for result in results
                    if isinstance(result, int)), default=0)
        if self._replicas.confirm(last):
            self._send(_replies(replies, results))
            return
        # Stopping: what was confirmed, up to the first write that was not
        # (the rest are stored, but an error would say they are not).
        confirmed = self._replicas.head
        results = iter(results)
        sent = []
        for reply in replies:
            if type(reply) is not bytes:
                result = next(results)
                if isinstance(result, int) and result > confirmed:
                    break
                reply = _acknowledgement(reply, result)
            sent.append(reply)
        self._send(b''.join(sent))
        raise _Unconfirmed()

    def _fail(self, error):
        with self._changed:
            self._failed = error
            self._batches.popleft()
            left, self._batches = self._batches, collections.deque()
            self._changed.notify_all()
        for _, _, holding in left:
            if holding:
                self._unacknowledged.end()

    def finish(self):
        """Wait until every reply is sent; raises _Unconfirmed if some
        could not be."""
        with self._changed:
            self._ending = True
            self._changed.notify_all()
        self.join()
        if isinstance(self._failed, _Unconfirmed):
            raise self._failed


class _Unconfirmed(Exception):
    """The server stopped before the followers confirmed the writes."""

    def __str__(self):
        return ('server stopping; writes the followers did not confirm are '
                'left unacknowledged')


# Seconds a write may wait for followers before the wait is logged, as it
# is at once when fewer followers report than are required.
_SYNC_WAIT_LOGGED_AFTER = 1.0
# Seconds a follower behind the head may take to reach the head it was
# behind, and still count as in step.
_IN_STEP_SECONDS = 1.0


class _Replica:
    """A follower's connection, as its reports left it."""

    __slots__ = ('connection', 'head', 'name', 'reached', 'target')

    def __init__(self, name, connection, head):
        self.name, self.connection = name, connection
        self.head = 0               # entries it holds durably, as reported
        # In step: it reached the head the primary had when it last
        # reached one (target) within _IN_STEP_SECONDS of that (reached).
        self.target, self.reached = head, -math.inf


class _Replicas:
    """The followers that report the entries they hold durably, and the
    entries that ``required`` of them hold: the confirmed entries.

    A follower is known by the name it gives: one that connects again
    (the old connection may linger, its loss not yet noticed) counts
    once, as its newest connection reports.  The confirmed head only ever
    grows: an entry ``required`` followers hold stays on them, even once
    they are gone.  It moves under the log's Condition, so the reads
    that wait on it wake as they do for the log's own head.

    With ``required`` above 0, writes are acknowledged only once
    confirmed (``confirm``), and readers are shown only confirmed entries:
    this is the log as they see it (``head``, ``read``, ``wait_for``,
    ``wake``).  At first nothing is confirmed, whatever the log holds: a
    restarted primary cannot know which of its entries the followers
    hold until they say so.  ``stopping`` turns true at ``close``: reads
    by followers go on until then (see ``Server.server_close``).
    """

    def __init__(self, log, logger):
        self.log = log
        self.logger = logger
        self.required = 0
        self.head = 0
        self.stopping = False
        self._condition = log.appended
        self._reporting = {}            # name -> _Replica
        # Since when writes have been waiting long (a record said so), and
        # the last entry a write waits for.
        self._waiting_since = None
        self._awaited = 0

    # -- the log, as readers see it -----------------------------------------

    def read(self, first, last, limit=math.inf):
        return self.log.read(first, last, limit)

    def keys(self, first, last):
        return self.log.keys(first, last)

    def wait_for(self, index, give_up):
        with self._condition:
            self._condition.wait_for(
                lambda: self.head >= index or give_up())

    def wake(self):
        self.log.wake()

    # -- followers ------------------------------------------------------------

    def join(self, name, connection):
        """A follower's connection introduced itself."""
        with self._condition:
            replaced = self._reporting.get(name)
            self._reporting[name] = _Replica(name, connection, self.log.head)
            followers = len(self._reporting)
        self.logger.info('a follower reports to this server', extra={
            'connection': connection, 'follower': name,
            'followers': followers, 'sync_replicas': self.required,
            **({} if replaced is None
               else {'replaces_connection': replaced.connection})})

    def leave(self, name, connection):
        with self._condition:
            replica = self._reporting.get(name)
            if replica is not None and replica.connection == connection:
                del self._reporting[name]

    def report(self, name, connection, head):
        """The follower holds entries 1 to head durably."""
        with self._condition:
            replica = self._reporting.get(name)
            if replica is None or replica.connection != connection:
                return                  # an older connection of it
            log_head = self.log.head
            # More than the log holds is not held: not of this log.
            replica.head = head = min(head, log_head)
            if head >= replica.target:
                replica.target, replica.reached = log_head, time.monotonic()
            if self.required and len(self._reporting) >= self.required:
                confirmed = sorted((replica.head for replica
                                    in self._reporting.values()),
                                   reverse=True)[self.required - 1]
                if confirmed > self.head:
                    self.head = confirmed
                    self._condition.notify_all()
                    if self._waiting_since is not None \
                            and confirmed >= self._awaited:
                        self.logger.info(
                            'writes flow again: the followers confirm them',
                            extra=self._context(waited=round(
                                time.monotonic() - self._waiting_since, 3)))
                        self._waiting_since = None

    def reported(self):
        """Each reporting follower's name, and the entries it holds."""
        with self._condition:
            return {name: replica.head
                    for name, replica in self._reporting.items()}

    def in_step(self):
        """How many followers report, and keep up: each holds the head,
        or last reached the head it was behind within a second."""
        with self._condition:
            return self._in_step()

    def _in_step(self):
        now, head = time.monotonic(), self.log.head
        return sum(1 for replica in self._reporting.values()
                   if replica.head >= head
                   or now - replica.reached < _IN_STEP_SECONDS)

    def _context(self, **context):
        # Under the lock.
        return dict(context, sync_replicas=self.required,
                    followers=len(self._reporting), in_step=self._in_step(),
                    head=self.log.head, confirmed=self.head)

    # -- writes ------------------------------------------------------------

    def confirm(self, index):
        """Wait until entry ``index`` is confirmed: True; False if the
        server stops first."""
        started = time.monotonic()
        with self._condition:
            while self.head < index and not self.stopping:
                if self._waiting_since is None:
                    waited = time.monotonic() - started
                    if len(self._reporting) >= self.required \
                            and waited < _SYNC_WAIT_LOGGED_AFTER:
                        self._condition.wait(_SYNC_WAIT_LOGGED_AFTER - waited)
                        continue
                    # Rare, and every write waits anyway: logged under
                    # the lock, so that records come in order.
                    self._waiting_since = started
                    self.logger.warning(
                        'writes are waiting for followers to confirm them',
                        extra=self._context())
                self._awaited = max(self._awaited, index)
                self._condition.wait()
            return self.head >= index

    def close(self):
        """The server stops: no write waits any longer."""
        with self._condition:
            self.stopping = True
            self._condition.notify_all()
            return self.log.head - self.head if self.required else 0


class _Tally:
    """Counts events, to log them at most once every so many seconds."""

    def __init__(self):
        self._count = 0
        self._logged = -math.inf

    def add(self, every):
        """Count one; the count to log now (then start again), or 0."""
        self._count += 1
        now = time.monotonic()
        if now - self._logged < every:
            return 0
        return self.take()

    def take(self):
        """The count not yet logged, to log now."""
        count, self._count, self._logged = self._count, 0, time.monotonic()
        return count


class _Connections:
    """The connections a server is serving, each as the socket to shut
    down at a stop: the one accepted, or the TLS connection over it."""

    def __init__(self):
        # socket accepted -> [socket, address, client or None, follower]
        self._served = {}
        self._clients = collections.Counter()   # client -> connections
        self._closed = False
        self._changed = threading.Condition(threading.Lock())

    def admit(self, request, client_address, limit):
        """Count a new connection in, unless there are ``limit`` already or
        the server is stopping; whether it was."""
        with self._changed:
            if self._closed or len(self._served) >= limit:
                return False
            self._served[request] = [request, client_address, None, False]
            return True

    def claim(self, request, client, limit):
        """Count a connection as one of ``client``'s (an address, or a
        certificate's name), unless it has ``limit`` already; whether it
        was."""
        with self._changed:
            served = self._served.get(request)
            if served is None or self._clients[client] >= limit:
                return False
            served[2] = client
            self._clients[client] += 1
            return True

    def wrap(self, request, wrap):
        """Serve the connection as ``wrap(request)`` from now on (it takes
        the socket over); that, or None if the server is stopping."""
        with self._changed:
            served = self._served.get(request)
            if served is None:
                return None
            served[0] = wrap(request)
            return None if self._closed else served[0]

    def current(self, request):
        """The socket to shut down for a connection accepted as request."""
        with self._changed:
            return self._served.get(request, [request])[0]

    def mark_follower(self, connection):
        """The connection (the socket served) is a follower's."""
        with self._changed:
            for served in self._served.values():
                if served[0] is connection:
                    served[3] = True

    def release(self, request):
        with self._changed:
            served = self._served.pop(request, None)
            if served is not None and served[2] is not None:
                self._clients[served[2]] -= 1
                if not self._clients[served[2]]:
                    del self._clients[served[2]]
            self._changed.notify_all()

    def close(self):
        """Admit no more; the connections being served: each its socket,
        its address, and whether it is a follower's."""
        with self._changed:
            self._closed = True
            return [(served[0], served[1], served[3])
                    for served in self._served.values()]

    def count(self):
        """How many connections are served."""
        return len(self._served)

    def wait(self, timeout=None):
        """Wait until none is served, up to timeout; whether none is."""
        with self._changed:
            return self._changed.wait_for(lambda: not self._served, timeout)

    def wait_for_clients(self, timeout):
        """Wait, up to timeout, until only followers' connections are
        served, or none of them is."""
        def done():
            followers = sum(served[3] for served in self._served.values())
            return followers in (0, len(self._served))
        with self._changed:
            self._changed.wait_for(done, timeout)


class _ServerCounts:
    """What a server counts, for monitoring, since it started: each a
    ``_Counter``.  Writes refused are counted by reason here for what the
    server refuses; the log counts what it refuses and fails."""

    def __init__(self):
        self.reads = _Counter()
        self.entries_sent = _Counter()
        self.bytes_received = _Counter()
        self.bytes_sent = _Counter()
        self.refused_writes = {'not allowed': _Counter(),
                               'invalid entry': _Counter()}
        self.refused_connections = {'too many connections': _Counter(),
                                    'too many from one client': _Counter()}
        self.handshakes_failed = _Counter()


class Server(socketserver.ThreadingTCPServer):
    """The TCP server: one thread per connection, all sharing one ``Log``.

    socketserver's hooks do the work: ``verify_request`` admits a connection
    (or refuses one too many), ``finish_request`` makes the TLS handshake
    and runs the ``Handler``, ``shutdown_request`` ends a connection and
    counts it out.  ``server_close`` stops gracefully: it ends every
    connection's input, so that each handler finishes and acknowledges the
    writes it has received, ends its read, and closes; then it waits for
    them, up to ``stop_timeout`` seconds, and cuts off the connections left
    (blocked sending to a client that does not read).

    Limits: at most ``max_connections`` connections are served at once, and
    at most ``max_connections_per_client`` from one client (with client
    certificates, one certificate's name; else one address); one more gets
    ``{"error":"too many connections"}`` and is closed at once.  A line
    longer than ``max_line`` bytes gets ``{"error":"message too large"}``
    and its connection is closed.

    Roles: with ``appenders`` (a set of certificate names), only a client
    whose certificate has one of them may append; any other gets ``{"id":
    ..., "error":"not allowed to append"}`` for its writes, and may read.

    Followers report the entries they hold to ``replicas`` (``_Replicas``).
    With ``sync_replicas`` above 0, a write is acknowledged only once that
    many followers hold it durably, and readers see only such entries;
    at a stop, the followers stay connected until the other connections
    have ended (up to ``stop_timeout``), so that the writes in flight can
    be confirmed, and any they did not confirm are left unacknowledged.

    With ``tls`` (an ``ssl.SSLContext``, see ``server_tls_context``) every
    connection speaks TLS.  The handshake is made in the connection's own
    thread, so a client stalling in it holds up no one, and a connection
    whose handshake has not ended within ``handshake_timeout`` seconds is
    closed.  A connection refused for being one too many is closed without
    a handshake, so without the error line.
    """

    allow_reuse_address = True
    daemon_threads = True
    # server_close waits for the connections (not their threads), and
    # cuts off those left after stop_timeout: see _Connections.
    block_on_close = False
    request_queue_size = 1024
    stop_timeout = 10.0     # seconds server_close waits before cutting off
    max_connections = 1024
    # A quarter of max_connections: a pool of a few dozen never meets it,
    # and one client that floods leaves three quarters to the others.
    max_connections_per_client = 256
    max_line = 16 << 20     # bytes, 16 MiB
    handshake_timeout = 10.0
    appenders = None        # certificate names that may append; None: all
    # Seconds between records of refusals (connections, writes, failed
    # accepts and handshakes); those in between are counted in the next
    # record, or at the stop.
    refusals_logged_every = 10.0

    def __init__(self, address, log, logger=None, handler_class=Handler,
                 bind_and_activate=True, tls=None):
        self.log = log
        self.logger = logger or logging.getLogger('tcplogserver')
        self.tls = tls
        self.connections = _Connections()
        self._connection_ids = itertools.count(1)
        self._refusals = _Tally()
        self._client_refusals = _Tally()
        self._write_refusals = _Tally()
        self._handshake_failures = _Tally()
        self._accept_failures = _Tally()
        self.replicas = _Replicas(log, self.logger)
        self.counted = _ServerCounts()
        self.encoded_lines = _EncodedLines()    # shared by every read
        self._pusher = None                     # made at the first read
        self._pusher_lock = threading.Lock()
        self.stopping = False
        if ':' in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler_class, bind_and_activate)

    def next_connection_id(self):
        return next(self._connection_ids)   # atomic under the GIL

    @property
    def sync_replicas(self):
        """Followers that must hold a write before it is acknowledged."""
        return self.replicas.required

    @sync_replicas.setter
    def sync_replicas(self, count):
        self.replicas.required = count

    @property
    def readable(self):
        """The log as readers see it: only its confirmed entries, with
        sync_replicas."""
        return self.replicas if self.replicas.required else self.log

    def pusher(self):
        """The thread that sends new entries to reads at the head."""
        with self._pusher_lock:
            if self._pusher is None:
                self._pusher = _Pusher(self.log, self)
                self._pusher.start()
            return self._pusher

    def get_request(self):
        try:
            return super().get_request()
        except OSError as error:
            if error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                               errno.ENOMEM):
                # The connection stays queued, so the listening socket stays
                # ready: without a pause this would spin.
                failed = self._accept_failures.add(self.refusals_logged_every)
                if failed:
                    self._log_accept_failures(failed, error)
                time.sleep(_ACCEPT_PAUSE)
            raise

    def verify_request(self, request, client_address):
        if self.connections.admit(request, client_address,
                                  self.max_connections):
            # With client certificates, the client is known after the
            # handshake (see finish_request).
            if self._by_certificate or self.connections.claim(
                    request, client_address[0],
                    self.max_connections_per_client):
                return True
            self.connections.release(request)
            if not self.stopping:
                self._refuse_client(request, client_address[0])
            return False
        if not self.stopping:
            self._refuse(request, client_address)
        return False            # socketserver shuts the connection down

    @property
    def _by_certificate(self):
        return self.tls is not None \
            and self.tls.verify_mode == ssl.CERT_REQUIRED

    def _refuse_client(self, request, client):
        self.counted.refused_connections['too many from one client'].add()
        refused = self._client_refusals.add(self.refusals_logged_every)
        if refused:
            self._log_client_refusals(refused, client)
        if self.tls is None:
            _send_without_blocking(request, _TOO_MANY)

    def _log_client_refusals(self, refused, client=None):
        context = {'limit': self.max_connections_per_client,
                   'refused': refused}
        if client is not None:
            context['client'] = client
        self.logger.warning('too many connections from one client; refusing '
                            'new ones', extra=context)

    def refused_write(self, connection_id, certificate):
        """A write was refused for the connection's role: log it, now and
        then."""
        refused = self._write_refusals.add(self.refusals_logged_every)
        if refused:
            self._log_write_refusals(refused, connection=connection_id,
                                     certificate=certificate)

    def _log_write_refusals(self, refused, **context):
        self.logger.warning('refused a write: not allowed to append',
                            extra=dict(context, refused=refused))

    def role(self, connection):
        """What a connection may do: 'appender' (read and append) or
        'reader' (read only)."""
        if self.appenders is None:
            return 'appender'
        names = _certificate_names(connection.getpeercert()
                                   if isinstance(connection, _TLSSocket)
                                   else None)
        return 'appender' if self.appenders.intersection(names) \
            else 'reader'

    def _refuse(self, request, client_address):
        self.counted.refused_connections['too many connections'].add()
        refused = self._refusals.add(self.refusals_logged_every)
        if refused:
            self._log_refusals(refused, remote=_remote(client_address))
        if self.tls is None:
            _send_without_blocking(request, _TOO_MANY)

    def _log_refusals(self, refused, **context):
        self.logger.warning('too many connections; refusing new ones',
                            extra=dict(context, limit=self.max_connections,
                                       refused=refused))

    def _log_accept_failures(self, failed, error=None):
        context = {'failed': failed}
        if error is not None:
            context['error'] = _describe(error)
        self.logger.error('cannot accept connections', extra=context)

    def process_request(self, request, client_address):
        try:
            super().process_request(request, client_address)
        except RuntimeError as error:       # out of threads: refuse it
            self.logger.error('cannot start a thread for a connection',
                              extra={'remote': _remote(client_address),
                                     'error': str(error)})
            self.shutdown_request(request)

    def finish_request(self, request, client_address):
        if self.tls is not None:
            connection = self._handshake(request, client_address)
            if connection is None:
                return
            if self._by_certificate:
                name = _certificate_subject(connection.getpeercert())
                if not self.connections.claim(
                        request, 'certificate %s' % name,
                        self.max_connections_per_client):
                    self._refuse_client(request, name)
                    try:
                        connection.sendall(_TOO_MANY)
                    except OSError:
                        pass
                    return
            request = connection
        super().finish_request(request, client_address)

    def _handshake(self, request, client_address):
        """The connection, now speaking TLS; None if the handshake failed."""
        connection = self.connections.wrap(
            request, lambda request: _TLSSocket(self.tls.wrap_socket(
                request, server_side=True, do_handshake_on_connect=False)))
        if connection is None:
            return None                 # stopping
        try:
            connection.handshake(self.handshake_timeout)
        except (OSError, ValueError) as error:
            if isinstance(error, (ssl.SSLEOFError, ssl.SSLZeroReturnError,
                                  ConnectionError)):
                # Port scanners and health checks connect and go away.
                self.logger.info('closed during the TLS handshake', extra={
                    'remote': _remote(client_address),
                    'error': _describe(error)})
                return None
            self.counted.handshakes_failed.add()
            failed = self._handshake_failures.add(self.refusals_logged_every)
            if failed:
                self._log_handshake_failures(failed, client_address, error)
            if isinstance(error, ssl.SSLError):
                _linger(connection)     # so that the client gets the alert
            return None
        return connection

    def _log_handshake_failures(self, failed, client_address=None,
                                error=None):
        context = {'failed': failed}
        if client_address is not None:
            context.update(remote=_remote(client_address),
                           error=_describe(error))
        self.logger.warning('TLS handshake failed', extra=context)

    def shutdown_request(self, request):
        # The request accepted; over TLS the connection is the wrapper.
        try:
            connection = self.connections.current(request)
            if isinstance(connection, _TLSSocket):
                connection.close_notify()
            super().shutdown_request(connection)
        finally:
            self.connections.release(request)

    def handle_error(self, request, client_address):
        self.logger.exception('connection failed', extra={
            'remote': _remote(client_address)})

    def server_close(self):
        self.stopping = True
        served = self.connections.close()
        self.log.wake()                 # reads waiting for entries end now
        deadline = time.monotonic() + self.stop_timeout
        if self.sync_replicas:
            # Followers first go on copying and confirming what the other
            # connections' last writes wait for.
            for connection, _, follower in served:
                if not follower:
                    _shutdown(connection, socket.SHUT_RD)
            self.connections.wait_for_clients(self.stop_timeout)
        unconfirmed = self.replicas.close()
        if unconfirmed:
            self.logger.warning(
                'stopping with entries the followers have not confirmed: '
                'they are stored here, never acknowledged', extra={
                    'entries': unconfirmed, 'head': self.log.head,
                    'confirmed': self.replicas.head})
        self.log.wake()
        for connection, _, _ in served:
            _shutdown(connection, socket.SHUT_RD)
        timeout = self.stop_timeout
        if self.sync_replicas:
            # What is left of it, but time for the followers to end.
            timeout = max(deadline - time.monotonic(), _READ_STOP_GRACE)
        if not self.connections.wait(timeout):
            for connection, client_address, _ in self.connections.close():
                self.logger.warning(
                    'cutting off a connection that does not read',
                    extra={'remote': _remote(client_address),
                           'waited': self.stop_timeout})
                _shutdown(connection)
            self.connections.wait()
        refused, failed = self._refusals.take(), self._accept_failures.take()
        if refused:
            self._log_refusals(refused)
        if failed:
            self._log_accept_failures(failed)
        for tally, log in ((self._client_refusals, self._log_client_refusals),
                           (self._write_refusals, self._log_write_refusals),
                           (self._handshake_failures,
                            self._log_handshake_failures)):
            count = tally.take()
            if count:
                log(count)
        super().server_close()

    @property
    def address(self):
        """The (host, port) actually bound: port 0 becomes a real port."""
        return self.socket.getsockname()[:2]


# ============================================================================
# Logging
# ============================================================================

# Python's level numbers to pino's (trace 10 ... fatal 60).
_PINO_LEVELS = ((logging.DEBUG - 5, 10), (logging.DEBUG, 20),
                (logging.INFO, 30), (logging.WARNING, 40),
                (logging.ERROR, 50), (logging.CRITICAL, 60))
_LEVEL_NAMES = {'trace': logging.DEBUG - 5, 'debug': logging.DEBUG,
                'info': logging.INFO, 'warn': logging.WARNING,
                'error': logging.ERROR, 'fatal': logging.CRITICAL,
                'silent': logging.CRITICAL + 10}
_RECORD_FIELDS = frozenset(vars(logging.makeLogRecord({}))) | {
    'message', 'asctime', 'taskName'}


class PinoFormatter(logging.Formatter):
    """Formats records as pino does: one JSON object a line.

    Fields: level (pino's numbers), time (ms since the epoch), pid,
    hostname, msg, then whatever the record carries in ``extra``.
    """

    def __init__(self):
        super().__init__()
        self.hostname = socket.gethostname()

    def format(self, record):
        level = 60
        for python_level, pino_level in _PINO_LEVELS:
            if record.levelno <= python_level:
                level = pino_level
                break
        fields = {'level': level, 'time': int(record.created * 1000),
                  'pid': record.process, 'hostname': self.hostname,
                  'msg': record.getMessage()}
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS:
                fields[key] = value
        if record.exc_info:
            fields['error'] = _describe(record.exc_info[1])
            fields['stack'] = self.formatException(record.exc_info)
        return json.dumps(fields, default=str, separators=(',', ':'))


# ============================================================================
# Client
# ============================================================================

class ClientError(Exception):
    """Something the client cannot do; network errors are ``OSError``s."""


class WriteError(ClientError):
    """The server refused an entry: ``error`` is its reason."""

    def __init__(self, error, entry=None):
        super().__init__(error)
        self.error, self.entry = error, entry


class ConnectionLost(ClientError):
    """A write was not acknowledged: the connection could not be made, or
    dropped first.

    The message says which: if the connection dropped after the write was
    sent, the entry may or may not be in the log, and appending it again
    may store it twice; if it could not be made (the server refused the
    client's TLS certificate, say), the entry is not in the log.
    """


class ReadError(ClientError):
    """An entry that the server could not read (its blob is missing, say).

    ``Reader`` yields it in the entry's place rather than raising it, so
    that the read goes on; raise it to stop.
    """

    def __init__(self, index, error):
        super().__init__('entry %d: %s' % (index, error))
        self.index, self.error = index, error


_FOLLOW_BATCH = 1000          # entries a Reader asks for at a time
_TAIL_RETRIES = 5             # reconnections tail tries, not following
_APPEND_WINDOW = 1000         # writes append_many keeps unacknowledged
_RESENDS = 10                 # tries to send a write again, at most
_KEEPALIVE = (30, 10, 3)      # idle seconds, seconds between probes, probes
_TLS_END_WAIT = 1.0           # seconds to let a client read why TLS ended


_LINE_BREAKS_TO_SPACES = bytes.maketrans(b'\r\n', b'  ')


class _HoldsBigInt(Exception):
    """An entry holds a BigInt, which json.dumps cannot write."""


def _no_big_int(value):
    if type(value) is BigInt:
        raise _HoldsBigInt()
    raise TypeError('Object of type %s is not JSON serializable'
                    % type(value).__name__)


def _encode_entry(entry):
    if entry is not None and not isinstance(entry, (dict, list)):
        raise TypeError('an entry is a dict, a list or None, not %s'
                        % type(entry).__name__)
    try:
        try:
            text = json.dumps(entry, allow_nan=False, separators=(',', ':'),
                              default=_no_big_int)
        except _HoldsBigInt:
            text = _encode_with_big_ints(entry)
    except RecursionError:
        raise ValueError('entry nested too deeply') from None
    return text.encode('ascii')


def _encode_with_big_ints(entry):
    """json.dumps, writing each BigInt as its digits.  (Rare, and slower.)

    json.dumps writes each BigInt as a string that holds a token no entry
    can hold, which the digits then replace, quotes and all.
    """
    token = 'BigInt-%s-' % os.urandom(16).hex()
    digits = []

    def placeholder(value):
        if type(value) is BigInt:
            digits.append(value.digits)
            return '%s%d' % (token, len(digits) - 1)
        return _no_big_int(value)
    text = json.dumps(entry, allow_nan=False, separators=(',', ':'),
                      default=placeholder)
    return re.sub('"%s([0-9]+)"' % token,
                  lambda match: digits[int(match.group(1))], text)


# -- the protocol, free of I/O ----------------------------------------------
#
# What a client knows of the protocol is here, once, and none of it does
# I/O: bytes and lines go in; messages to send, and what the server's
# replies mean, come out (as h11 does for HTTP).  Client and Reader drive it
# with threads and sockets, AsyncClient and AsyncReader with asyncio
# streams, so the two cannot come to mean different things.

def _one_line(text):
    """An entry's JSON text made fit to send as part of one message line.

    A line break is white space between JSON tokens (a string cannot hold
    one), and would end the message early."""
    return text.strip().translate(_LINE_BREAKS_TO_SPACES)


def _checked_json(text):
    """What an entry given as JSON text holds, checked before it is sent:
    bytes holding one JSON object, array or null."""
    if not isinstance(text, bytes):
        raise TypeError('an entry as JSON is bytes, not %s'
                        % type(text).__name__)
    try:
        value = parse_json(text)
    except RecursionError:
        raise ValueError('entry nested too deeply') from None
    if value is not None and type(value) not in (dict, list):
        raise TypeError('an entry is a JSON object, array or null')
    return value


def _lost_writes(error):
    """The ConnectionLost for a write awaiting acknowledgement on a
    connection that failed with error."""
    if _refused_by_tls(error):
        return ConnectionLost('the server refused the connection (%s); the '
                              'entry is not in the log' % _describe(error))
    return ConnectionLost('the connection was lost before the server '
                          'acknowledged the write (%s); the entry may or may '
                          'not be in the log' % _describe(error))


def _unsent_writes(error):
    """The ConnectionLost for a write never sent: no connection could be
    made (error says why)."""
    return ConnectionLost('cannot connect to the server: %s'
                          % _describe(error))


def _raise_first_failure(results):
    """Raise the first exception among results (an index or an exception
    for each entry of append_many), with results attached."""
    for result in results:
        if isinstance(result, Exception):
            result.results = results
            raise result


class _Lines:
    """Cuts what a server sends into lines, without their line ends; a
    line of JSON white space alone is dropped.

    A line that comes in many pieces is joined once, when its end comes,
    not at every piece: an entry may be megabytes long.
    """

    def __init__(self):
        self._pieces = []       # of the line not yet ended

    def feed(self, data):
        """The lines that data ends, in order."""
        if b'\n' not in data:
            if data:
                self._pieces.append(data)
            return []
        if self._pieces:
            self._pieces.append(data)
            data = b''.join(self._pieces)
            self._pieces = []
        *lines, rest = data.split(b'\n')
        if rest:
            self._pieces.append(rest)
        return [line for line in lines if line.strip(_JSON_SPACE)]


# The question a client asks a server before it may send a write again
# (see _idempotence_window).
_IDEMPOTENCE_QUESTION = b'{"ask":"idempotence"}\n'


def _idempotence_window(line):
    """What a server's answer to _IDEMPOTENCE_QUESTION says: for how many
    entries it keeps the ids of idempotent writes; 0 for none, as the
    Node.js server (and a version of this one before it kept ids), which
    answers "invalid message".  OSError for what is no answer."""
    try:
        answer = parse_json(line)
    except ValueError:
        answer = None
    if type(answer) is dict:
        window = answer.get('idempotence')
        if type(window) is int and window >= 0:
            return window
        if answer == {'error': 'invalid message'}:
            return 0
    raise OSError('the server answered %r to the question whether it keeps '
                  'ids' % line[:200])


class _Write(collections.namedtuple('_Write', 'id handle entry text')):
    """A write: its id, what its caller waits on, its entry, the text
    of its entry as sent."""

    __slots__ = ()


class _Writes:
    """The writes sent on one connection and not yet acknowledged, oldest
    first.

    ``send`` gives the message line that carries an entry and remembers
    ``handle`` with it (whatever the caller will wait on: a future);
    ``received`` matches a reply line to the oldest write.  The server
    answers a connection's writes in the order they came, so a reply that
    is not for the oldest is an error of the protocol.

    Given ``ids`` (an iterator of ids unique to the client, over all its
    connections), its writes are idempotent, and ``resend`` sends one
    taken from another connection again, with its id; without, their ids
    are "1", "2"... as any client's.
    """

    def __init__(self, ids=None):
        self._waiting = collections.deque()     # of _Write
        if ids is None:
            self._ids, self._flag = map(str, itertools.count(1)), b''
        else:
            self._ids, self._flag = ids, b',"idempotent":true'

    def send(self, text, handle, entry=None):
        """The message that appends text (made by _one_line); expect its
        acknowledgement for handle."""
        return self.resend(_Write(next(self._ids), handle, entry, text))

    def resend(self, write):
        """The message that sends a write (taken from another connection)
        on this one."""
        self._waiting.append(write)
        return b'{"id":"%s","entry":%s%s}\n' % (
            write.id.encode('ascii'), write.text, self._flag)

    def received(self, line, reply=None):
        """(handle, outcome) for a reply line: outcome is the entry's
        index, or the WriteError of an entry refused.  Raises ValueError
        for what is not JSON, ClientError for a reply to no write waiting.
        ``reply``, if given, is the line parsed already (by parse_json, in
        a thread that need not hold the lock over this)."""
        if reply is None:
            reply = parse_json(line)
        expected = self._waiting[0] if self._waiting else None
        if (expected is None or type(reply) is not dict
                or reply.get('id') != expected.id):
            raise ClientError('unexpected reply from the server: %s'
                              % canonical_json(reply).decode())
        self._waiting.popleft()
        if 'index' in reply:
            return expected.handle, reply['index']
        return expected.handle, WriteError(str(reply.get('error')),
                                           expected.entry)

    def last(self):
        """The handle of the write sent last, if it waits still."""
        return self._waiting[-1].handle if self._waiting else None

    def take(self):
        """Every write still waiting, forgotten: the connection is gone,
        and no reply will come."""
        waiting, self._waiting = self._waiting, collections.deque()
        return list(waiting)


class _Resume(Exception):
    """A read cannot go on over this connection, but can over a new one,
    from where it stands: ``error`` says why."""

    def __init__(self, error):
        super().__init__(error)
        self.error = error


class _ReadState:
    """Where a read of the log stands, across the connections it takes:
    the index of the next entry to yield (the point to resume from),
    whether it is current, and whether to ask the server for more.

    For each connection: ``connected``, then ``request`` before each
    receive (a read message to send, or None), and ``parse`` and ``take``
    for each line received.  ``take`` gives the ``(index, entry)`` to yield,
    or None; an entry sent twice is yielded once.  Once ``finished`` (the
    head is reached, not following) there is nothing more to read.
    """

    def __init__(self, start, follow, batch):
        if start < 1 or batch < 1:
            raise ValueError('start and batch must be positive')
        self.next_index = start
        self.follow, self.batch = follow, batch
        self.current = False
        self.finished = False
        self._asking = True         # a read is to be sent

    def connected(self):
        """A new connection: what it has not been asked, it will not send."""
        self.current = False
        self._asking = True

    def request(self):
        """The read message to send now, if one is due."""
        if not self._asking:
            return None
        self._asking = False
        return b'{"from":%d,"read":%d}\n' % (self.next_index, self.batch)

    @staticmethod
    def parse(line):
        """A line as a message; OSError or ValueError if it is none."""
        message = parse_json(line)
        if type(message) is not dict:
            raise OSError('the server sent %r' % line)
        return message

    def take(self, message):
        """The (index, entry) a message gives, or None.  Raises _Resume for
        a connection that skipped an entry, and ClientError for a message
        the protocol has no place for."""
        index = message.get('index')
        if index == self.next_index:
            self.next_index += 1
            if 'entry' in message:
                return index, message['entry']
            return index, ReadError(index, str(message.get('error')))
        if type(index) is int and index < self.next_index:
            return None     # sent twice (the Node.js server may): once only
        if index is not None:
            raise _Resume(ClientError('the server skipped to entry %s'
                                      % index))
        if message.get('current') is True:
            self.current = True
            self.finished = not self.follow
        elif 'head' in message:
            if not self.follow and self.next_index > message['head']:
                self.current = self.finished = True
            else:
                self._asking = True
        else:
            raise ClientError('unexpected message from the server: %s'
                              % canonical_json(message).decode())
        return None


def _backoff_delay(backoff, failures):
    """Seconds to wait after failures in a row: backoff[0], doubling up to
    backoff[1], less a random share of up to half, so that clients that
    lost one server do not all come back at once."""
    first, most = backoff
    delay = most if failures > 64 else min(most, first * 2 ** (failures - 1))
    return delay * random.uniform(0.5, 1.0)


class _ReconnectPolicy:
    """Whether, and after how long, a reader tries again to reach a server
    it lost, by the client's ``backoff`` and ``retries``.

    It gives up at once if it never connected (the address is more likely
    wrong than the server restarting) or if TLS refused it (trying again
    would not change that), and after ``retries`` failures in a row.
    """

    def __init__(self, client):
        self._client = client
        self.failures = 0           # in a row
        self._connected = False     # ever

    def connected(self):
        self._connected = True

    def answered(self):
        """The server answered: whether that ends a run of failures."""
        if not self.failures:
            return False
        self.failures = 0
        return True

    def failed(self, error):
        """Seconds to wait before trying again, or None to give up."""
        self.failures += 1
        retries = self._client.retries
        if not self._connected or _refused_by_tls(error) or (
                retries is not None and self.failures > retries):
            return None
        return _backoff_delay(self._client.backoff, self.failures)


def _keep_alive(sock):
    """Set a new connection up for long-lived use."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    if hasattr(socket, 'TCP_KEEPIDLE'):
        # Notice a dead peer in a minute, not in the default two hours.
        for option, value in zip(('TCP_KEEPIDLE', 'TCP_KEEPINTVL',
                                  'TCP_KEEPCNT'), _KEEPALIVE):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option),
                            value)


# -- the client on threads ----------------------------------------------------

class Client:
    """A client of tcplogserver (or of the Node.js tcp-log-server).

    Appends go over one connection, opened at the first append and opened
    again at the next append after it drops.  They are pipelined: each
    thread sends without waiting for earlier acknowledgements, and a thread
    of the client's receives the acknowledgements and matches them to the
    writes, in order, so appends from many threads share the connection.
    The futures of ``append_async`` are completed in that thread: a
    callback added to one must not wait for another append.  Each ``read``
    opens a connection of its own.

    ``timeout`` bounds connecting, sending, and waiting for an
    acknowledgement; a write that exceeds it fails the connection, and with
    it every write still awaiting acknowledgement on it (which is then sent
    again, as below).  A ``Reader`` that
    loses its connection reconnects after ``backoff[0]`` seconds, doubling
    up to ``backoff[1]``, each delay jittered; after ``retries`` failed
    attempts in a row (None: never) it raises the error.

    Writes are idempotent, with ids unique to the client, and each
    connection for appends first asks the server whether it keeps their
    ids.  When a connection is lost, the writes it had not acknowledged
    are sent again, with their ids, on a new connection (with the same
    backoff), if the server of the lost connection and that of the new one
    both said they keep ids: a server that does (tcplogserver) stores each
    once, and answers each with its one index.  A write is sent again at
    most ``resends`` times; then, as against a server that keeps no ids
    (the Node.js server), it fails with ``ConnectionLost``.  A new write
    that finds the server gone, once the client has reached it before, is
    sent once it is back, after as many tries.  With ``resends`` 0, writes
    are neither idempotent nor sent again.
    """

    def __init__(self, host='127.0.0.1', port=8089, timeout=10.0,
                 backoff=(0.1, 5.0), retries=None, tls=None,
                 resends=_RESENDS):
        self.address = (host, port)
        self.tls = tls
        self.timeout = timeout
        self.backoff = backoff
        self.retries = retries
        self.resends = resends
        self._send_lock = threading.Lock()
        self._appender = None
        self._closed = False
        self._closing = threading.Event()   # wakes resends waiting to try
        # The ids of this client's writes: unique to it, on every
        # connection it makes.
        self._ids = map(('%s-%%d' % os.urandom(12).hex()).__mod__,
                        itertools.count(1))
        self._reached = False           # a server answered, ever
        # Resends under way: new writes wait.  Counted under _handing_off,
        # as connections hand their writes off; waited on under _send_lock.
        self._resending = 0
        self._handing_off = threading.Lock()
        self._resent = threading.Condition(self._send_lock)

    def connect(self):
        """A new socket to the server, set up for long-lived use."""
        sock = socket.create_connection(self.address, timeout=self.timeout)
        _keep_alive(sock)
        if self.tls is not None:
            try:
                sock = _TLSSocket(self.tls.wrap_socket(
                    sock, server_hostname=self.address[0],
                    do_handshake_on_connect=False))
                sock.handshake(self.timeout)
            except BaseException:
                sock.close()
                raise
        return sock

    # -- appending ----------------------------------------------------------

    def append(self, entry):
        """Append an entry (a dict, list or None); its index, once durable.

        Raises ``WriteError`` if the server refuses it, ``ConnectionLost``
        if the connection drops first.
        """
        return self._wait(self.append_async(entry))

    def append_many(self, entries, window=_APPEND_WINDOW):
        """Append entries in order, pipelined; their indices, in order.

        At most ``window`` writes await acknowledgement at a time.  If any
        entry fails (refused, not an entry, the connection lost), every
        write sent is still awaited, then the first failure is raised, with
        ``results`` (an index or an exception for each entry) attached.
        """
        entries = iter(entries)
        results = []
        for result in self._append_each(entries, window, False):
            if isinstance(result, _Unreachable):    # none will go
                lost = _unsent_writes(result.error)
                results.append(lost)
                results.extend(lost for _ in entries)
            else:
                results.append(result)
        _raise_first_failure(results)
        return results

    def append_each(self, entries, window=_APPEND_WINDOW, as_json=False):
        """Append entries in order, pipelined; yield, in order, each one's
        index, or the exception it failed with (``WriteError``,
        ``ConnectionLost``, or TypeError or ValueError for what is not an
        entry), without raising it.

        At most ``window`` writes await acknowledgement at a time, and the
        next entry is taken from ``entries`` only once there is room: with
        a window of 1, each is acknowledged before the next is taken.  With
        ``as_json`` the entries are JSON texts, as ``append_json`` takes.
        If the server cannot be reached, the writes already sent are
        yielded, and then the OSError is raised.
        """
        for result in self._append_each(entries, window, as_json):
            if isinstance(result, _Unreachable):
                raise result.error
            yield result

    def _append_each(self, entries, window, as_json):
        # As append_each, but the server being out of reach is yielded last,
        # as an _Unreachable, and not raised: only a send can tell it.
        send = self.append_json if as_json else self.append_async
        waiting = collections.deque()
        for entry in entries:
            try:
                waiting.append(send(entry))
            except OSError as error:
                # Before ValueError: a certificate error is both.
                while waiting:
                    yield self._outcome(waiting.popleft())
                yield _Unreachable(error)
                return
            except (TypeError, ValueError) as error:
                waiting.append(error)
            if len(waiting) >= window:
                yield self._outcome(waiting.popleft())
        while waiting:
            yield self._outcome(waiting.popleft())

    def append_async(self, entry):
        """Send an entry now; a ``concurrent.futures.Future`` of its index."""
        return self._send(_encode_entry(entry), entry)

    def append_json(self, text, entry=None):
        """Like ``append_async``, for an entry already written as JSON.

        ``text`` is bytes holding one JSON object, array or null; anything
        else raises ValueError or TypeError, before anything is sent.  The
        server stores big integer literals exactly as written.  ``entry``,
        if given, is what a ``WriteError`` will carry.
        """
        value = _checked_json(text)
        return self._send(text, value if entry is None else entry)

    def _send(self, text, entry):
        future = _Acknowledgement()
        future.set_running_or_notify_cancel()   # sent: no taking it back
        text = _one_line(text)
        failure = None
        with self._send_lock:
            while True:
                # Writes sent again go first: a connection's writes are
                # stored in the order they are sent.
                self._resent.wait_for(lambda: not self._resending
                                      or self._closed)
                if self._closed:
                    raise ClientError('the client is closed')
                appender = self._appender
                message = None if appender is None \
                    else appender.add(future, text, entry)
                if message is not None:
                    break
                if self._resending:
                    continue    # the connection was lost, its writes are due
                if appender is not None:
                    appender.sock.close()   # failed; no one sends on it now
                appender = self._appender = self._appender_again(appender)
            try:
                appender.sock.sendall(message)
            except BaseException as error:  # noqa: BLE001 -- raised below
                # KeyboardInterrupt too: part of the line may have gone, and
                # nothing more may follow it on this connection.
                failure = error
                if isinstance(error, (ssl.SSLZeroReturnError,
                                      ssl.SSLEOFError)):
                    # TLS had ended: the receiving thread read why (a
                    # refusal of the client's certificate, say), and its
                    # reason, not this one, is the writes'.
                    appender.let_receiving_end(_TLS_END_WAIT)
                waiting, cause = appender.stop(error)
        if failure is not None:
            # Outside the lock: callbacks run, and may append.
            self._lost(appender, waiting, cause)
            if not isinstance(failure, Exception):
                raise failure
        return future

    def _appender_again(self, lost):
        """A new connection for appends, in place of none or the lost one.

        The first sends its question with its first write.  Once a server
        has answered one, each asks before anything is sent on it, and
        one that cannot be made or is not answered (a relay whose server
        is down accepts, then closes) is tried again, with the backoff,
        ``resends`` times."""
        if lost is not None and lost.keeps_ids is not None:
            self._reached = True
        if not self._reached or not self.resends:
            return _Appender(self.connect(), self,
                             self._ids if self.resends else None)
        tries = 0
        while True:
            try:
                return self._asked_appender()
            except OSError as error:
                tries += 1
                if tries > self.resends or _refused_by_tls(error):
                    raise
                if self._closing.wait(_backoff_delay(self.backoff, tries)):
                    raise ClientError('the client is closed') from None

    def _hand_off(self):
        """A lost connection's writes are to be sent again: new writes
        wait until they are.  (Called by the connection, under its lock,
        as it takes them: no new write may slip in before.)"""
        with self._handing_off:
            self._resending += 1

    def _lost(self, appender, writes, cause):
        """A connection for appends failed (cause says why) with writes
        not acknowledged: send them again if the connection handed them
        off (its server keeps ids), or fail them."""
        if not writes:
            return
        if not appender.handed_off:
            appender.fail(writes, cause)
            return
        threading.Thread(target=self._resend, args=(writes, cause),
                         daemon=True, name='tcplogserver-resend').start()

    def _resend(self, writes, cause):
        """Send writes again, on a connection whose server says it keeps
        ids; in a thread of its own, while new writes wait."""
        failed = []         # (writes, ConnectionLost), failed at the end
        try:
            tries = 0
            while writes and not self._closed:
                tries += 1
                for write in writes:
                    write.handle.resends += 1
                spent = [write for write in writes
                         if write.handle.resends > self.resends]
                if spent:
                    failed.append((spent, ConnectionLost(
                        'the connection was lost before the server '
                        'acknowledged the write (%s), and %d tries to send '
                        'it again failed; the entry may or may not be in the '
                        'log' % (_describe(cause), self.resends))))
                    writes = [write for write in writes
                              if write.handle.resends <= self.resends]
                    if not writes:
                        continue
                if self._closing.wait(_backoff_delay(self.backoff, tries)):
                    break
                try:
                    appender = self._asked_appender()
                except OSError as error:
                    cause = error
                    if _refused_by_tls(error):
                        failed.append((writes, _lost_writes(error)))
                        writes = []
                    continue
                if not appender.keeps_ids:
                    failed.append((writes, ConnectionLost(
                        'the connection was lost before the server '
                        'acknowledged the write (%s), and the server now '
                        'reached keeps no ids, so it was not sent again; the '
                        'entry may or may not be in the log'
                        % _describe(cause))))
                    writes = []
                with self._send_lock:
                    if self._closed:
                        appender.sock.close()
                        break
                    if self._appender is not None:
                        self._appender.retire()
                    self._appender = appender
                    writes, cause = appender.send_again(writes)
        finally:
            if writes:          # closed meanwhile, or an error unforeseen
                failed.append((writes, ConnectionLost(
                    'the client was closed before the server acknowledged '
                    'the write; the entry may or may not be in the log')
                    if self._closed else _lost_writes(cause)))
            with self._send_lock, self._handing_off:
                self._resending -= 1
                self._resent.notify_all()
            # Last: their callbacks may append.
            for lost, error in failed:
                for write in lost:
                    if not write.handle.done():
                        write.handle.set_exception(error)

    def _asked_appender(self):
        """A new connection for appends, once its server has said whether
        it keeps ids."""
        sock = self.connect()
        try:
            sock.sendall(_IDEMPOTENCE_QUESTION)
            lines = _Lines()
            answer = []
            while not answer:
                chunk = sock.recv(_RECEIVE_SIZE)
                if not chunk:
                    raise OSError('the server closed the connection')
                answer = lines.feed(chunk)
            if len(answer) > 1:
                raise OSError('the server sent %r unasked' % answer[1][:200])
            window = _idempotence_window(answer[0])
        except BaseException:
            sock.close()
            raise
        self._reached = True
        return _Appender(sock, self, self._ids, window > 0)

    def _wait(self, future):
        # A write not acknowledged in time is lost with its connection,
        # and then sent again, as any lost write is: each time it times
        # out counts, so that ``resends`` bounds the wait too.
        while True:
            try:
                return future.result(self.timeout)
            except concurrent.futures.TimeoutError:
                future.appender.lose(OSError('no acknowledgement within %s s'
                                             % self.timeout))

    def _outcome(self, future):
        """A write's index, or the exception it failed with."""
        if isinstance(future, Exception):
            return future
        try:
            return self._wait(future)
        except ClientError as error:
            return error

    # -- reading ------------------------------------------------------------

    def read(self, start=1, follow=True, batch=_FOLLOW_BATCH):
        """A ``Reader`` of the entries from ``start`` on: see ``Reader``."""
        return Reader(self, start, follow, batch)

    # -- closing ------------------------------------------------------------

    def close(self):
        """Wait for the appends sent (up to ``timeout``), then disconnect."""
        self._closing.set()
        with self._send_lock:
            self._closed = True
            appender, self._appender = self._appender, None
            self._resent.notify_all()
        if appender is not None:
            appender.finish(self.timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


class _Unreachable:
    """The server could not be reached to send an entry: ``error`` why."""

    def __init__(self, error):
        self.error = error


class _Acknowledgement(concurrent.futures.Future):
    """The future index of a write, the connection it was sent on, and
    the times it was sent again."""

    appender = None
    resends = 0


class _Appender:
    """One connection's appends: writes sent and not yet acknowledged (its
    _Writes), and the thread that receives their acknowledgements.

    With ``ids`` (the client's), its writes are idempotent, and its first
    message asks the server whether it keeps their ids: ``keeps_ids`` is
    None until the answer comes, unless the answer came before (``asked``,
    what it said).  When the connection is lost, the writes still waiting
    go to the ``client``'s ``_lost``; ``handed_off`` if they are to be
    sent again (the server keeps ids), which the client is told at once.
    """

    def __init__(self, sock, client, ids=None, asked=None):
        self.sock = sock            # with the client's timeout, for sends
        self.keeps_ids = asked
        self.handed_off = False
        self._client = client
        # The question goes with the first write; its answer comes first.
        self._asking = self._unasked = ids is not None and asked is None
        self._lock = threading.Lock()           # over _writes and _failure
        self._writes = _Writes(ids)
        self._failure = None
        self._receiving = None

    def add(self, future, text, entry):
        """The message that appends text, its acknowledgement expected for
        future; None once disconnected."""
        with self._lock:
            if self._failure is not None:
                return None
            future.appender = self
            message = self._writes.send(text, future, entry)
            if self._unasked:
                message = _IDEMPOTENCE_QUESTION + message
                self._unasked = False
            self._receive_from_now()
            return message

    def send_again(self, writes):
        """Send writes lost with another connection on this one: (the
        writes it lost meanwhile, and why), or ([], None)."""
        with self._lock:
            if self._failure is not None:
                return writes, self._failure
            messages = []
            for write in writes:
                write.handle.appender = self
                messages.append(self._writes.resend(write))
            self._receive_from_now()
        try:
            self.sock.sendall(b''.join(messages))
        except OSError as error:
            return self.stop(error, hand_off=False)
        return [], None

    def _receive_from_now(self):
        # Only once the first write is awaited: a connection lost at once
        # (a TLS server refusing the client's certificate says so after
        # the handshake) fails that write too.
        if self._receiving is None:
            self._receiving = threading.Thread(
                target=self._receive, daemon=True, name='tcplogserver-client')
            self._receiving.start()

    def _receive(self):
        lines = _Lines()
        try:
            while True:
                try:
                    chunk = self.sock.recv(_RECEIVE_SIZE)
                except socket.timeout:  # noqa: UP041 -- not TimeoutError in 3.9
                    continue        # quiet: waiting writers time out alone
                if not chunk:
                    raise OSError('the server closed the connection')
                for line in lines.feed(chunk):
                    if self._asking:
                        self.keeps_ids = _idempotence_window(line) > 0
                        self._asking = False
                        continue
                    reply = parse_json(line)    # outside the senders' lock
                    with self._lock:
                        future, outcome = self._writes.received(line, reply)
                    if isinstance(outcome, WriteError):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        except (OSError, ValueError, ClientError) as error:
            self.lose(error)

    def stop(self, error, hand_off=True):
        """Take no more writes, and disconnect; the writes still waiting,
        and the connection's first failure (error, or one before it).
        Unless ``hand_off`` is false, the writes are handed off to be sent
        again if the server said it keeps ids."""
        with self._lock:
            if self._failure is None:
                self._failure = error
            waiting = self._writes.take()
            failure = self._failure
            # Only a connection lost: not a server that said something
            # unlooked for (message too large, say), which would again.
            if waiting and hand_off and self.keeps_ids is True \
                    and isinstance(failure, OSError) \
                    and not _refused_by_tls(failure):
                self.handed_off = True
                self._client._hand_off()
        _shutdown(self.sock)
        return waiting, failure

    def retire(self):
        """Give way to another connection: close this one if it is lost;
        else half-close it, so that the writes sent on it are answered
        first (another thread's, sent as the connection before was lost)."""
        with self._lock:
            lost = self._failure is not None
        if lost:
            self.sock.close()
        else:
            _shutdown(self.sock, socket.SHUT_WR)

    def let_receiving_end(self, timeout):
        """Give the receiving thread up to timeout to see the connection's
        end, unless this is that thread (a callback that appends)."""
        receiving = self._receiving
        if receiving is not threading.current_thread():
            receiving.join(timeout)

    def lose(self, error):
        """Disconnect, and hand every write still waiting to on_lost."""
        self._client._lost(self, *self.stop(error))

    @staticmethod
    def fail(waiting, error):
        """Fail the writes stop() returned (they may run callbacks)."""
        for write in waiting:
            if not write.handle.done():
                write.handle.set_exception(_lost_writes(error))

    def finish(self, timeout):
        """Half-close: the server acknowledges what it has, then closes."""
        _shutdown(self.sock, socket.SHUT_WR)
        with self._lock:
            last = self._writes.last()
        if last is not None:
            concurrent.futures.wait([last], timeout)
        self.lose(OSError('the client closed the connection'))
        self.sock.close()


class _ReadPosition:
    """Where a read stands, as its ``_ReadState`` (``self._read``) says:
    what ``Reader`` and ``AsyncReader`` show of it."""

    @property
    def next_index(self):
        """The index of the next entry to yield."""
        return self._read.next_index

    @property
    def current(self):
        return self._read.current

    @property
    def follow(self):
        return self._read.follow

    @property
    def batch(self):
        return self._read.batch


class Reader(_ReadPosition):
    """The entries of a log from ``start`` on, as ``(index, entry)`` pairs.

    Iterate over it.  It asks the server for ``batch`` entries at a time,
    and with ``follow`` true goes on forever, yielding entries as they are
    appended; with ``follow`` false it stops at the head.  ``current`` is
    true once it has yielded every entry up to the head.  An entry the
    server cannot read comes as a ``ReadError`` in the entry's place.

    If the connection drops it reconnects, with the client's backoff, and
    goes on from one past the last index it yielded: no entry is skipped or
    yielded twice.  (If the first connection fails, the error is raised at
    once: the address is more likely wrong than the server restarting; so
    is a TLS refusal, which trying again would not change.)
    ``close`` (or a ``with`` block) disconnects, from any thread.

    Two attributes, None by default, tell a program what goes on: it calls
    ``on_lost(error)`` when a connection it had fails and it is going to
    try again, and ``on_back()`` when, after that, the server answers once
    more.
    """

    on_lost = None
    on_back = None

    def __init__(self, client, start=1, follow=True, batch=_FOLLOW_BATCH):
        self._read = _ReadState(start, follow, batch)
        self.client = client
        self._policy = _ReconnectPolicy(client)
        self._lock = threading.Lock()       # over _connection and _closed
        self._connection = None     # (socket, its _Lines, lines to take)
        self._closed = threading.Event()
        self._interrupted = False

    def __iter__(self):
        return self

    def __next__(self):
        read = self._read
        while not self._closed.is_set():
            if self._interrupted:
                self.close()
                break
            message = self._receive()
            if message is None:
                continue                # the read is asked again
            try:
                pair = read.take(message)
            except _Resume as resume:
                self._lost(resume.error)
                continue
            except ClientError:
                self.close()
                raise
            if pair is not None:
                return pair
            if read.finished:
                self.close()
        raise StopIteration

    def _receive(self):
        """The next message, or None after losing the connection."""
        try:
            connection = self._connection
            if connection is None:
                connection = self._connect()
                if connection is None:
                    return None                 # closed meanwhile
            sock, lines, ready = connection
            request = self._read.request()
            if request is not None:
                sock.sendall(request)
            while not ready:
                chunk = sock.recv(_RECEIVE_SIZE)
                if not chunk:
                    raise OSError('the server closed the connection')
                ready.extend(lines.feed(chunk))
            message = self._read.parse(ready.popleft())
            if self._policy.answered() and self.on_back is not None:
                self.on_back()
            return message
        except (OSError, ValueError) as error:
            self._lost(error)
            return None

    def _connect(self):
        sock = self.client.connect()
        self._policy.connected()
        if self.follow:
            sock.settimeout(None)           # a log may be quiet
        connection = sock, _Lines(), collections.deque()
        with self._lock:
            if self._closed.is_set():
                sock.close()
                return None
            self._connection = connection
        self._read.connected()
        return connection

    def _lost(self, error):
        """The connection failed: reconnect after a while, or give up."""
        self._disconnect()
        if self._closed.is_set() or self._interrupted:
            return
        delay = self._policy.failed(error)
        if delay is None:
            self._closed.set()
            raise error
        if self._policy.failures == 1 and self.on_lost is not None:
            self.on_lost(error)
        self._closed.wait(delay)

    def _disconnect(self):
        with self._lock:
            connection, self._connection = self._connection, None
        if connection is not None:
            sock = connection[0]
            _shutdown(sock)             # wakes a thread waiting to receive
            sock.close()

    def close(self):
        """Stop, and disconnect; may be called from another thread."""
        with self._lock:
            self._closed.set()
        self._disconnect()

    def interrupt(self):
        """Stop soon; for a signal handler, so it waits for no lock: the
        iteration ends, and disconnects, in its own thread."""
        self._interrupted = True
        connection = self._connection
        if connection is not None:
            _shutdown(connection[0])    # wakes the receive

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


# ============================================================================
# Asyncio client
# ============================================================================

class _ImportedWhenUsed:
    """Stands for a module until its first use, then imports it and puts
    it in its place: a server never needs asyncio, and importing it costs
    a start-up 10 to 30 ms (a third of all the rest)."""

    def __init__(self, name):
        self._name = name

    def __getattr__(self, attribute):
        module = __import__(self._name)
        globals()[self._name] = module
        return getattr(module, attribute)


asyncio = _ImportedWhenUsed('asyncio')
_DRAIN_ABOVE = 1 << 16        # bytes buffered to send before a send waits


class AsyncClient:
    """``Client`` for asyncio programs: the same options, the same
    protocol core, the same semantics, with coroutines for methods; but
    its writes are plain, and not sent again (as ``Client(resends=0)``).

    Appends from any number of tasks share one connection, opened at the
    first append and again at the next append after it drops, and are
    pipelined: a task of the client's receives the acknowledgements and
    matches them to the writes, in order.  Each ``read`` opens a
    connection of its own.

    Cancelling an append (``task.cancel()``, ``asyncio.wait_for``) raises
    CancelledError in the task that awaited it, and nowhere else: a write
    already sent stays on the connection, which goes on with the other
    appends, and its acknowledgement is taken when it comes (the entry may
    be in the log).  An append cancelled while connecting sent nothing.

    ``timeout`` bounds connecting, sending and waiting for an
    acknowledgement, as for ``Client``.  Use it from one event loop.
    """

    def __init__(self, host='127.0.0.1', port=8089, timeout=10.0,
                 backoff=(0.1, 5.0), retries=None, tls=None):
        self.address = (host, port)
        self.tls = tls
        self.timeout = timeout
        self.backoff = backoff
        self.retries = retries
        self._appender = None
        self._connecting = None     # the task that opens the next one
        self._closed = False

    async def connect(self):
        """A new connection to the server, set up for long-lived use: an
        asyncio ``(StreamReader, StreamWriter)`` pair."""
        host, port = self.address
        connecting = asyncio.ensure_future(asyncio.open_connection(
            host, port, ssl=self.tls,
            server_hostname=None if self.tls is None else host))
        try:
            # Not asyncio.wait_for, which before Python 3.12 can lose a
            # cancellation that comes as the connection is made.
            made, _ = await asyncio.wait([connecting], timeout=self.timeout)
        finally:
            if not connecting.done():
                connecting.cancel()
                connecting.add_done_callback(_abort_connection)
        if not made:
            raise socket.timeout('timed out')  # noqa: UP041
        reader, writer = connecting.result()
        sock = writer.get_extra_info('socket')
        if sock is not None:        # None: lost already, which a read says
            _keep_alive(sock)
        return reader, writer

    # -- appending ----------------------------------------------------------

    async def append(self, entry):
        """Append an entry (a dict, list or None); its index, once durable.

        Raises ``WriteError`` if the server refuses it, ``ConnectionLost``
        if the connection drops first, TypeError or ValueError for what is
        not an entry (before anything is sent).
        """
        return await self._acknowledged(
            await self._send(_encode_entry(entry), entry))

    async def append_json(self, text, entry=None):
        """Like ``append``, for an entry already written as JSON: ``text``
        is bytes holding one JSON object, array or null, checked before
        anything is sent.  ``entry``, if given, is what a ``WriteError``
        will carry."""
        value = _checked_json(text)
        return await self._acknowledged(
            await self._send(text, value if entry is None else entry))

    async def append_many(self, entries, window=_APPEND_WINDOW):
        """Append entries in order, pipelined; their indices, in order.

        At most ``window`` writes await acknowledgement at a time.  If any
        entry fails (refused, not an entry, the connection lost), every
        write sent is still awaited, then the first failure is raised, with
        ``results`` (an index or an exception for each entry) attached.
        """
        entries = iter(entries)
        results = []
        waiting = collections.deque()
        for entry in entries:
            try:
                waiting.append(await self._send(_encode_entry(entry), entry))
            except OSError as error:
                # Before ValueError: a certificate error is both.
                while waiting:
                    results.append(await self._outcome(waiting.popleft()))
                lost = _unsent_writes(error)
                results.append(lost)
                results.extend(lost for _ in entries)
                break
            except (TypeError, ValueError) as error:
                waiting.append(error)
            if len(waiting) >= window:
                results.append(await self._outcome(waiting.popleft()))
        while waiting:
            results.append(await self._outcome(waiting.popleft()))
        _raise_first_failure(results)
        return results

    async def _send(self, text, entry):
        """Send an entry: (its connection, the future of its index)."""
        text = _one_line(text)
        appender = await self._connected()
        future = appender.send(text, entry)
        await appender.drain(self.timeout)
        return appender, future

    async def _connected(self):
        """The connection to send on: the one open, or a new one."""
        if self._closed:
            raise ClientError('the client is closed')
        appender = self._appender
        if appender is not None and appender.failure is None:
            return appender
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        # Shielded: an append cancelled while connecting must not cancel
        # the connection other appends wait for.
        appender = await asyncio.shield(self._connecting)
        if self._closed:
            raise ClientError('the client is closed')
        # Even if lost already: the write sent on it fails, as with Client.
        return appender

    async def _open(self):
        try:
            reader, writer = await self.connect()
        finally:
            self._connecting = None
        if self._closed:
            writer.transport.abort()
            raise ClientError('the client is closed')
        self._appender = _AsyncAppender(reader, writer)
        return self._appender

    async def _acknowledged(self, sent):
        """A write's index, once acknowledged (raising what it failed
        with); a wait that exceeds the timeout fails the connection."""
        appender, future = sent
        if not future.done():
            # asyncio.wait neither cancels the future (the connection's,
            # which awaits its reply even if the caller is cancelled) nor
            # loses the caller's cancellation, as asyncio.wait_for can
            # before Python 3.12.
            await asyncio.wait([future], timeout=self.timeout)
            if not future.done():
                appender.lose(OSError('no acknowledgement within %s s'
                                      % self.timeout))
        return future.result()

    async def _outcome(self, sent):
        """A write's index, or the exception it failed with."""
        if isinstance(sent, Exception):
            return sent
        try:
            return await self._acknowledged(sent)
        except ClientError as error:
            return error

    # -- reading ------------------------------------------------------------

    def read(self, start=1, follow=True, batch=_FOLLOW_BATCH):
        """An ``AsyncReader`` of the entries from ``start`` on."""
        return AsyncReader(self, start, follow, batch)

    # -- closing ------------------------------------------------------------

    async def close(self):
        """Wait for the appends sent (up to ``timeout``), then disconnect."""
        self._closed = True
        appender, self._appender = self._appender, None
        if appender is not None:
            await appender.finish(self.timeout)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.close()


def _abort_connection(connecting):
    """End the connection a task made, if it made one, once no one wants
    it (its connect was cancelled, or timed out)."""
    if not connecting.cancelled() and connecting.exception() is None:
        connecting.result()[1].transport.abort()


def _settle(future, outcome):
    """Complete an append's future with an index or an exception."""
    if future.done():
        return
    if isinstance(outcome, Exception):
        future.set_exception(outcome)
        # Taken as seen: the append that waited for it may have been
        # cancelled, and asyncio would log it as never retrieved.
        future.exception()
    else:
        future.set_result(outcome)


def _buffered(writer):
    """Bytes a StreamWriter holds, not yet sent."""
    try:
        return writer.transport.get_write_buffer_size()
    except AttributeError:      # Python 3.9's TLS, once the connection is lost
        return 0


class _AsyncAppender:
    """One connection's appends, for AsyncClient: writes sent and not yet
    acknowledged (its _Writes), and the task that receives their
    acknowledgements."""

    def __init__(self, reader, writer):
        self._reader, self._writer = reader, writer
        self._loop = asyncio.get_running_loop()
        self._writes = _Writes()
        self.failure = None
        self._receiving = None
        # Python 3.9's StreamWriter lets one task wait in drain at a time.
        self._draining = asyncio.Lock()

    def send(self, text, entry):
        """Send text (made by _one_line) now; the future of its index."""
        future = self._loop.create_future()
        if self.failure is not None:
            _settle(future, _lost_writes(self.failure))
            return future
        self._writer.write(self._writes.send(text, future, entry))
        if self._receiving is None:
            # Only once the first write is awaited: a connection lost at
            # once (a TLS server refusing the client's certificate says so
            # after the handshake) fails that write too.
            self._receiving = self._loop.create_task(self._receive())
        return future

    async def drain(self, timeout):
        """Wait, up to timeout, while too much waits to be sent; a send that
        takes longer fails the connection."""
        if self.failure is not None or _buffered(self._writer) <= _DRAIN_ABOVE:
            return
        async with self._draining:
            # A timer, not asyncio.wait_for, which before Python 3.12 can
            # lose a cancellation of the caller.
            timer = None if timeout is None else self._loop.call_later(
                timeout, self.lose, socket.timeout('timed out'))  # noqa: UP041
            try:
                await self._writer.drain()
            except OSError as error:
                self.lose(error)
            finally:
                if timer is not None:
                    timer.cancel()

    async def _receive(self):
        lines = _Lines()
        try:
            while True:
                chunk = await self._reader.read(_RECEIVE_SIZE)
                if not chunk:
                    raise OSError('the server closed the connection')
                for line in lines.feed(chunk):
                    _settle(*self._writes.received(line))
        except (OSError, ValueError, ClientError) as error:
            self.lose(error)

    def lose(self, error):
        """Disconnect, and fail every write still waiting."""
        if self.failure is None:
            self.failure = error
        self._writer.transport.abort()
        for write in self._writes.take():
            _settle(write.handle, _lost_writes(error))

    async def finish(self, timeout):
        """Wait for the last write's acknowledgement (up to timeout), then
        disconnect."""
        if self.failure is None and self._writer.can_write_eof():
            # Half-close: the server acknowledges what it has, then closes.
            self._writer.write_eof()
        last = self._writes.last()
        if last is not None:
            await asyncio.wait([last], timeout=timeout)
        self.lose(OSError('the client closed the connection'))
        if self._receiving is not None:
            self._receiving.cancel()
            await asyncio.wait([self._receiving])


class AsyncReader(_ReadPosition):
    """``Reader`` for asyncio: ``async for index, entry in reader``.

    The same protocol core gives the same semantics: ``batch`` entries
    asked for at a time, ``follow`` for ever or not, ``current``, a
    ``ReadError`` in place of an entry the server cannot read, and after a
    lost connection a new one, with the client's backoff and retries,
    going on from ``next_index``: nothing skipped, nothing twice.
    ``on_lost(error)`` and ``on_back()`` are called as ``Reader`` calls
    them.  ``await close()`` (or ``async with``) stops it, from any task of
    its loop.  A cancelled ``__anext__`` loses nothing: the next goes on
    where it stood.
    """

    on_lost = None
    on_back = None

    def __init__(self, client, start=1, follow=True, batch=_FOLLOW_BATCH):
        self._read = _ReadState(start, follow, batch)
        self.client = client
        self._policy = _ReconnectPolicy(client)
        self._connection = None     # (StreamReader, StreamWriter)
        self._lines = _Lines()
        self._ready = collections.deque()       # lines received, to take
        self._closed = False
        self._timed_out = False     # the connection, waiting for a reply
        self._woken = None          # a future, made in the loop, that close
                                    # completes

    def __aiter__(self):
        return self

    async def __anext__(self):
        read = self._read
        while not self._closed:
            # Lines received already are taken without a coroutine's cost
            # each: a catch-up read has hundreds in every chunk.
            line = self._ready.popleft() if self._ready \
                else await self._next_line()
            if line is None:
                continue                # the read is asked again
            try:
                message = read.parse(line)
            except (OSError, ValueError) as error:
                await self._lost(error)
                continue
            if self._policy.answered() and self.on_back is not None:
                self.on_back()
            try:
                pair = read.take(message)
            except _Resume as resume:
                await self._lost(resume.error)
                continue
            except ClientError:
                self._stop()
                raise
            if pair is not None:
                return pair
            if read.finished:
                self._stop()
        raise StopAsyncIteration

    async def _next_line(self):
        """The next line the server sends, asked for if need be; None after
        losing the connection."""
        try:
            if self._connection is None and not await self._connect():
                return None                     # closed meanwhile
            reader, writer = self._connection
            request = self._read.request()
            if request is not None:
                writer.write(request)
            while not self._ready:
                chunk = await self._chunk(reader)
                if not chunk:
                    raise OSError('the server closed the connection')
                self._ready.extend(self._lines.feed(chunk))
            return self._ready.popleft()
        except OSError as error:
            await self._lost(error)
            return None

    async def _chunk(self, reader):
        timeout = self.client.timeout
        if self.follow or timeout is None:
            return await reader.read(_RECEIVE_SIZE)     # a log may be quiet
        # A timer that ends the connection, not asyncio.wait_for, which
        # before Python 3.12 can lose a cancellation of the caller.
        timer = asyncio.get_running_loop().call_later(timeout, self._time_out)
        try:
            chunk = await reader.read(_RECEIVE_SIZE)
        finally:
            timer.cancel()
        if self._timed_out:
            raise socket.timeout('timed out')  # noqa: UP041
        return chunk

    def _time_out(self):
        self._timed_out = True
        self._disconnect()
    async def _connect(self):
        reader, writer = await self.client.connect()
        self._policy.connected()
        if self._closed:
            writer.transport.abort()
            return False
        self._connection = reader, writer
        self._timed_out = False
        self._read.connected()
        return True

    async def _lost(self, error):
        """The connection failed: reconnect after a while, or give up."""
        self._disconnect()
        if self._closed:
            return
        delay = self._policy.failed(error)
        if delay is None:
            self._closed = True
            raise error
        if self._policy.failures == 1 and self.on_lost is not None:
            self.on_lost(error)
        if self._closed:
            return                      # by on_lost
        if self._woken is None:
            self._woken = asyncio.get_running_loop().create_future()
        await asyncio.wait([self._woken], timeout=delay)

    def _disconnect(self):
        connection, self._connection = self._connection, None
        # What a lost connection still held answered the read it was
        # asked: the next connection is asked afresh.
        self._lines, self._ready = _Lines(), collections.deque()
        if connection is not None:
            connection[1].transport.abort()     # wakes a task receiving

    def _stop(self):
        self._closed = True
        if self._woken is not None and not self._woken.done():
            self._woken.set_result(None)
        self._disconnect()

    async def close(self):
        """Stop, and disconnect."""
        self._stop()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc_info):
        await self.close()


# ============================================================================
# Following
# ============================================================================

# A read that never ends, in practice: the Node.js server reads its FILE
# up to byte (from + read - 1) * 65, which must be an integer a double holds
# exactly (below 2**53), or it crashes.
_LAST_READABLE = (2 ** 53 - 1) // 65

# Bytes a copy takes from the primary at once.  Whatever has arrived is
# stored in one commit, up to _COPY_COMMIT_BYTES: a follower that keeps up
# commits a little at a time, one that falls behind a lot at once, as group
# commit does.
_COPY_RECEIVE_SIZE = 1 << 16
_COPY_COMMIT_BYTES = 1 << 20
_PRIMARY_MAX_LINE = 1 << 31     # bytes an entry line from the primary may hold
_CATCHING_UP_EVERY = 10.0       # seconds between "catching up" records
_STILL_FAILING_EVERY = 60.0     # seconds between records of a failing primary

# An entry as the primary sends it, most likely (with its key, if it has
# one and the read asked for keys); its entry is then read without the
# message around it (see _canonical_form).
_ENTRY_MESSAGE = re.compile(
    b'\\{"index":([1-9][0-9]*),(?:"key":"([0-9a-f]{%d})",)?"entry":(.*)\\}'
    b'[ \t\r]*' % (2 * KEY_SIZE), re.DOTALL)


def _endless(first):
    """The count of a read from ``first`` that never ends: over 10**14."""
    return _LAST_READABLE - first + 1


class _Diverged(Exception):
    """The primary's log is not the one this log copied."""


class _AskAgain(Exception):
    """An empty primary has been silent a while: connect again, to learn
    that it is still there (a read waiting for its first entry cannot be
    probed: the probe could become a read of its own)."""


class _Unreadable(Exception):
    """The primary sent an entry as a read error in its place."""

    def __init__(self, index, error):
        super().__init__('the primary cannot read entry %s: %s'
                         % (index, error))
        self.index = index


class _Copy:
    """One connection's worth of copying a primary's log into ``log``.

    It asks for the primary's entry at the log's head (``check``): if that
    is not the log's own entry there, or the primary has no entry there,
    the two logs have different histories (``_Diverged``).  The reply ends
    with the primary's head.  Then it asks for everything after the head,
    up to ``until`` (the primary's head then, with ``until='head'``) or
    for ever (None), and stores what arrives together in one commit.

    ``run`` returns once it has copied up to ``until``, or once
    ``stopping()``.  It raises ``_Diverged`` when the histories differ,
    ``_Unreadable`` for an entry the primary sends as a read error,
    ``_AskAgain`` to reconnect to a silent empty primary, and what a
    failing connection (OSError), a primary sending what it should not
    (ValueError, RecursionError) or storage (LogError) raise.  A copy for
    ever is the one read a silent primary can be asked to answer while it
    stays open: a second read, refused "already reading".

    A copy for ever names the follower in its check (``"follower"``); a
    primary that counts followers' reports answers ``{"reports":true}``
    first, and from then on the copy tells it, after the check and after
    each commit, the entries the log holds durably: ``{"durable":H}``.
    A primary that does not (the Node.js server) ignores the name, and is
    told nothing.  If the log keeps keys, every read asks for them
    (``"ids":true``), and each entry that has one comes with its key, to
    be kept with the entry; the Node.js server ignores that too.
    """

    def __init__(self, follower, sock, until=None):
        self.follower = follower
        self.log = follower.log
        self.sock = sock
        self.until = until
        self.start = max(self.log.head, 1)
        self.check = self.log.name(self.log.head) if self.log.head else None
        self.first = self.next = self.log.head + 1     # the next to store
        self.checking = True                # the check's read is open
        self.endless = False                # the read for ever is open
        self.waiting = False                # for an empty primary's first
        self.named = until is None          # the check names the follower
        self.reporting = False              # the primary asked for reports
        self._reported = None               # the head last reported
        self.copied = 0
        self.began = time.monotonic()
        self.batch = []
        self.batch_keys = []                # for each entry, its key or None
        # Ask for keys along with entries: a primary that keeps none (the
        # Node.js server) ignores it, and sends none.
        self._ids = b',"ids":true' if self.log.idempotence_window else b''

    def run(self, stopping):
        follower = self.follower
        self.sock.settimeout(follower.timeout / 3)
        self._ask(self.start, 1, follower.name if self.named else None)
        splitter = _LineSplitter(_PRIMARY_MAX_LINE)
        heard = time.monotonic()
        while not stopping():
            try:
                chunk = self.sock.recv(_COPY_RECEIVE_SIZE)
            except socket.timeout:  # noqa: UP041 -- 3.9
                silence = time.monotonic() - heard
                if silence >= follower.timeout and self.waiting:
                    raise _AskAgain() from None
                if silence >= follower.timeout:
                    raise OSError('nothing heard from the primary for %.0f '
                                  'seconds' % silence) from None
                if self.endless:
                    self._ask(self.start, 1)    # "already reading", it says
                continue
            received = 0
            while chunk:
                follower.heard = time.monotonic()
                for line in splitter.feed(chunk):
                    if line.strip(_JSON_SPACE) and self._take(line):
                        self._store()
                        return
                if splitter.too_long:
                    raise ValueError('the primary sent a line of more than '
                                     '%d bytes' % _PRIMARY_MAX_LINE)
                received += len(chunk)
                chunk = received < _COPY_COMMIT_BYTES \
                    and len(self.batch) < _MAX_BATCH and self._arrived()
            if chunk == b'':
                raise OSError('the primary closed the connection')
            self._store()
            # Silence is counted from here: storing is not the primary's.
            heard = time.monotonic()
            follower.progress()

    def _ask(self, first, count, name=None):
        named = b'' if name is None \
            else b',"follower":%s' % canonical_json(name)
        self.sock.sendall(b'{"from":%d,"read":%d%s%s}\n'
                          % (first, count, named, self._ids))

    def _report(self):
        """Tell a primary that asked what the log holds durably."""
        head = self.log.head
        if self.reporting and head != self._reported:
            self.sock.sendall(b'{"durable":%d}\n' % head)
            self._reported = head

    def _arrived(self):
        """What more has arrived, without waiting: bytes, b'' at the end of
        the stream, or None if nothing has."""
        self.sock.settimeout(0.0)
        try:
            return self.sock.recv(_COPY_RECEIVE_SIZE)
        except (BlockingIOError, socket.timeout):  # noqa: UP041 -- 3.9
            return None
        finally:
            self.sock.settimeout(self.follower.timeout / 3)

    def _take(self, line):
        """Act on a line from the primary; True once the copy is done."""
        entry = _ENTRY_MESSAGE.fullmatch(line)
        if entry is not None:
            try:
                data = _canonical_form(entry.group(3))
            except (ValueError, RecursionError):
                pass                # not one value: parsed whole below
            else:
                key = entry.group(2)
                self._take_entry(int(entry.group(1)), data,
                                 key and bytes.fromhex(key.decode('ascii')))
                return False
        message = parse_json(line)
        if type(message) is not dict:
            raise ValueError('the primary sent %s' % _clip(line))
        index = message.get('index')
        if index is not None:
            if 'entry' not in message:
                self._store()
                raise _Unreadable(index, message.get('error'))
            self._take_entry(index, canonical_json(message['entry']),
                             _copied_key(message.get('key')))
        elif message.get('current') is True:
            if self.endless:
                self._store()
                self.follower.caught_up_with(self)
            elif not self.checking:
                return True             # the primary has no more to give
            elif self.check is not None:
                raise _Diverged(
                    "the primary's head is below this log's (%d): it is not "
                    "the log this one copied, or it has lost entries since"
                    % self.log.head)
            elif self.until is not None:
                return True             # a copy up to an empty log's head
            else:
                self.follower.primary_head = 0  # empty: wait for entry 1
                self.waiting = True
                self.follower.connected()
                self.follower.went_on(self)
        elif type(message.get('head')) is int and self.checking:
            return self._checked(message['head'])
        elif type(message.get('head')) is int and not self.endless:
            return True                 # the copy up to until is over
        elif message.get('error') == 'already reading' and self.endless:
            pass                        # the answer to a probe
        elif message.get('reports') is True and self.checking:
            self.reporting = self.named
        elif type(message.get('error')) is str:
            raise OSError('the primary says: %s' % message['error'])
        else:
            raise ValueError('the primary sent %s' % _clip(line))
        return False

    def _take_entry(self, index, data, key=None):
        if self.check is not None:
            if index != self.start:
                raise ValueError('the primary sent entry %s, not entry %d'
                                 % (index, self.start))
            if self.log.hash(data) != self.check:
                raise _Diverged(
                    "the primary's entry %d is not this log's entry %d: the "
                    "logs have different histories" % (index, index))
            self.check = None
            return
        expected = self.next + len(self.batch)
        if index != expected:
            if type(index) is int and 1 <= index < expected:
                # The Node.js server may send an entry appended during a
                # catch-up twice: once only, if it is the same.
                held = self.log.name(index) if index < self.next \
                    else self.log.hash(self.batch[index - self.next])
                if self.log.hash(data) == held:
                    return
                raise _Diverged("the primary sent entry %d again, and not "
                                "as before" % index)
            raise ValueError('the primary sent entry %s, not entry %d'
                             % (index, expected))
        self.waiting = False
        self.batch.append(data)
        self.batch_keys.append(key)
        if len(self.batch) == _MAX_BATCH:
            self._store()

    def _checked(self, head):
        """The reply to the check is over: ask for what comes after."""
        if self.check is not None:
            raise ValueError('the primary ended the read of entry %d without '
                             'sending it' % self.start)
        self.checking = False
        follower = self.follower
        follower.primary_head = max(head, self.next + len(self.batch) - 1)
        self.until = head if self.until == 'head' else self.until
        self._store()
        self._report()
        follower.connected()
        if self.copied:                 # entry 1, with the check
            follower.went_on(self)
        if self.until is None:
            self._ask(self.next, _endless(self.next))
            self.endless = True
            return False
        if self.until < self.next:
            return True
        self._ask(self.next, self.until - self.next + 1)
        return False

    def _store(self):
        if not self.batch:
            return
        batch, self.batch = self.batch, []
        keys, self.batch_keys = self.batch_keys, []
        first = self.next
        try:
            self.log.extend(first, batch, keys if any(keys) else None)
            if not self.checking:
                self._report()
        finally:
            stored = self.log.head - first + 1
            self.next += stored
            self.copied += stored
            follower = self.follower
            if follower.primary_head is None \
                    or follower.primary_head < self.log.head:
                follower.primary_head = self.log.head
            if stored and not self.checking:
                follower.went_on(self)


def _copied_key(key):
    """The key of an entry from the primary, as bytes, or None."""
    if key is None:
        return None
    if type(key) is not str or not re.fullmatch('[0-9a-f]{%d}'
                                               % (2 * KEY_SIZE), key):
        raise ValueError('the primary sent an entry with the key %r' % key)
    return bytes.fromhex(key)


def _clip(line, length=200):
    text = line.decode('utf-8', 'replace')
    return text if len(text) <= length else text[:length] + '...'


class Follower:
    """Makes ``log`` a copy of a primary's, and keeps it one, in a thread.

    ``connect()`` gives a new connection to the primary; ``primary`` names
    it, for people.  The follower needs nothing of the primary but
    ordinary reads, so it follows the Node.js server too.  Each connection
    first checks that the primary's entry at this log's head is this log's
    entry there (see ``_Copy``); then it copies every entry after, as the
    primary appends them, those that arrive together in one commit
    (``Log.extend``).  If the check fails, the logs have different
    histories: the follower stops, leaving the log as it is, and
    ``stopped`` says why.

    A connection that fails or stays silent (the primary is probed after a
    third of ``timeout``, and given up after all of it) is made again after
    ``backoff[0]`` seconds, doubling up to ``backoff[1]``, jittered.

    What it knows of the primary: ``primary_head``, the last entry
    received once ``caught_up`` (before, the head the primary had when it
    connected; entries on their way are not counted), and ``heard``, the
    ``time.monotonic()`` of its last message.  The log must refuse appends
    (``Log(refuse_appends=...)``): an entry appended to it would take an
    index that is the primary's.

    ``name`` is how it introduces itself to a primary that counts the
    reports of its followers (for synchronous replication), which counts
    the connections of one name as one follower: no two followers may
    share one.  The default is unique to this ``Follower``.
    """

    def __init__(self, log, connect, primary, timeout=10.0,
                 backoff=(0.1, 5.0), logger=None, name=None):
        self.log = log
        self.connect = connect
        self.primary = primary
        self.name = name or '%s:%d:%s' % (socket.gethostname(), os.getpid(),
                                          os.urandom(4).hex())
        self.timeout = timeout
        self.backoff = backoff
        self.logger = logger or logging.getLogger('tcplogserver')
        self.primary_head = None
        self.heard = None
        self.caught_up = False
        self.stopped = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()       # over _socket
        self._socket = None
        self._thread = None
        self._reported = 0.0            # when "catching up" was last logged
        # Since 'following the primary' was logged, and no failure was.
        self._following = False
        self._progressed = False        # this connection went on (went_on)
        self._connecting = False

    # -- what it knows, for records -----------------------------------------

    def _context(self, **context):
        heard = None if self.heard is None \
            else round(time.monotonic() - self.heard, 3)
        return {'primary': self.primary, 'head': self.log.head,
                'primary_head': self.primary_head, 'heard': heard, **context}

    def connected(self):
        """The connection passed its check."""
        self.caught_up = False
        self._reported = time.monotonic()

    def went_on(self, copy):
        """The connection stored entries, or learnt there are none yet.

        Only then is the primary being followed: a connection that passes
        its check and fails at once (an entry the primary cannot read, a
        full disk) is one more failure of a series, logged once.
        """
        self._progressed = True
        if not self._following:         # since the start, or a failure
            self._following = True
            self.logger.info('following the primary', extra=self._context(
                head=copy.first - 1,        # where this connection began
                reporting=copy.reporting, follower=self.name))

    def caught_up_with(self, copy):
        """The copy has every entry the primary has (and has stored them)."""
        self.went_on(copy)
        self.primary_head = self.log.head
        if not self.caught_up:
            self.caught_up = True
            self.logger.info('caught up with the primary', extra=self._context(
                copied=copy.copied,
                seconds=round(time.monotonic() - copy.began, 3)))

    def progress(self):
        """A commit is done: log how far it is, now and then."""
        now = time.monotonic()
        if self._following and not self.caught_up \
                and now - self._reported >= _CATCHING_UP_EVERY:
            self._reported = now
            self.logger.info('catching up with the primary',
                             extra=self._context())

    # -- running ------------------------------------------------------------

    def start(self):
        self._thread = _thread_without_signals(self._run, 'follow',
                                               daemon=True)

    def stop(self):
        """Stop following, from any thread, and wait until it has.

        A connection being made cannot be cut short: the thread then ends
        once it is made or has failed, and touches the log no more.
        """
        with self._lock:
            self._stopping.set()
            if self._socket is not None:
                _shutdown(self._socket)
            connecting = self._connecting
        if self._thread is not None and not connecting:
            self._thread.join()

    def _run(self):
        failures = 0
        last_logged = 0.0
        while not self._stopping.is_set():
            try:
                self._copy()
                return
            except _Diverged as error:
                self.stopped = str(error)
                self.logger.error('stopped following: the logs differ',
                                  extra=self._context(error=self.stopped))
                return
            except _AskAgain:
                continue
            except Exception as error:  # noqa: BLE001 -- logged; goes on
                if self._stopping.is_set():
                    return
                self.caught_up = False
                if self._progressed:
                    failures = 0        # it went on a while: a new series
                failures += 1
                now = time.monotonic()
                if failures == 1 or now - last_logged >= _STILL_FAILING_EVERY:
                    last_logged = now
                    self._following = False
                    self._log_failure(error, failures)
            self._stopping.wait(_backoff_delay(self.backoff, failures))

    def _log_failure(self, error, failures):
        context = self._context(error=_describe(error), attempts=failures)
        if not isinstance(error, (OSError, ValueError, RecursionError,
                                  LogError, _Unreadable)):
            # A bug, most likely: a following that stopped would leave the
            # server serving an ever older copy, looking well.
            self.logger.exception('following failed; trying again',
                                  extra=context)
        elif isinstance(error, _Unreadable):
            self.logger.error('the primary cannot read an entry; trying '
                              'again', extra=dict(context, index=error.index))
        elif isinstance(error, LogError):
            self.logger.error('cannot store entries copied from the primary; '
                              'trying again', extra=context)
        else:
            self.logger.warning('lost the primary; trying again',
                                extra=context)

    def copy_to_head(self):
        """Copy, over one connection, the primary's entries up to the head
        it has now; how many were copied.  Raises what ends the copy
        early: ``OSError`` (the connection), ``ValueError`` (what the
        primary sent), ``LogError`` (storing), ``ClientError`` (the logs
        differ, or the primary cannot read an entry)."""
        try:
            copy = self._copy(until='head')
        except (_Diverged, _Unreadable) as error:
            raise ClientError(str(error)) from None
        if self._stopping.is_set():
            raise ClientError('stopped before the copy was done')
        return copy.copied

    def _copy(self, until=None):
        """Copy over one connection: up to ``until`` (see ``_Copy``), or
        until stopped."""
        self._progressed = False
        with self._lock:
            if self._stopping.is_set():
                return None
            self._connecting = True
        sock = None
        try:
            sock = self.connect()
        finally:
            with self._lock:
                self._connecting = False
                stopping = self._stopping.is_set()
                if not stopping:
                    self._socket = sock
        if stopping:
            sock.close()
            return None
        try:
            copy = _Copy(self, sock, until)
            copy.run(self._stopping.is_set)
            return copy
        finally:
            with self._lock:
                self._socket = None
            _shutdown(sock)
            sock.close()


# ============================================================================
# Monitoring
# ============================================================================

# A request to the metrics listener: the bytes its request line and headers
# may hold, the seconds it may take to arrive whole, and how many are
# served at once (one more is closed unanswered).
_HTTP_REQUEST_BYTES = 16 << 10
_HTTP_REQUEST_SECONDS = 10.0
_HTTP_CONNECTIONS = 16
# Entries a follower may be behind its primary and still be ready.
_READY_LAG = 1000


def _label(value):
    """A label value as the text format writes it."""
    return '"%s"' % str(value).replace('\\', '\\\\').replace(
        '"', '\\"').replace('\n', '\\n')


class _Exposition:
    """Metric families, written in the Prometheus text format (0.0.4)."""

    def __init__(self):
        self.lines = []

    def family(self, name, kind, help, samples):
        """samples: (labels dict or None, value) pairs, or a value."""
        name = 'tcplogserver_' + name
        self.lines.append('# HELP %s %s' % (name, help))
        self.lines.append('# TYPE %s %s' % (name, kind))
        if not isinstance(samples, list):
            samples = [(None, samples)]
        for labels, value in samples:
            self.lines.append('%s%s %s' % (name, self._labels(labels),
                                           self._number(value)))

    def histogram(self, name, help, snapshot):
        bounds, counts, total = snapshot
        name = 'tcplogserver_' + name
        self.lines.append('# HELP %s %s' % (name, help))
        self.lines.append('# TYPE %s histogram' % name)
        for bound, count in zip(bounds + ('+Inf',), counts):
            self.lines.append('%s_bucket{le="%s"} %d' % (
                name, bound if bound == '+Inf' else self._number(bound),
                count))
        self.lines.append('%s_sum %s' % (name, self._number(total)))
        self.lines.append('%s_count %d' % (name, counts[-1]))

    @staticmethod
    def _labels(labels):
        if not labels:
            return ''
        return '{%s}' % ','.join('%s=%s' % (key, _label(value))
                                 for key, value in labels.items())

    @staticmethod
    def _number(value):
        if isinstance(value, bool):
            return '1' if value else '0'
        if isinstance(value, int):
            return str(value)
        if math.isnan(value):
            return 'NaN'
        return repr(float(value))

    def text(self):
        return '\n'.join(self.lines) + '\n'


class Monitor:
    """What a running server says of itself: its metrics (``metrics()``,
    the Prometheus text format) and whether it is ready (``not_ready()``:
    None, or why not).

    ``files`` is (FILE, BLOBS), whose file systems' free space it gives
    (``memory`` for neither); ``follower`` the server's ``Follower``, if
    any; a follower is ready while it follows within ``ready_lag``
    entries of its primary.  ``serving`` is set once the server listens,
    and cleared when it stops.
    """

    def __init__(self, server, follower=None, files=(MEMORY, MEMORY),
                 ready_lag=_READY_LAG):
        self.server = server
        self.log = server.log
        self.follower = follower
        self.files = files
        self.ready_lag = ready_lag
        self.serving = False
        self.started = time.time()

    def not_ready(self):
        """Why the server should not be sent traffic now, or None."""
        if not self.serving:
            return 'not serving: starting or stopping'
        broken = self.log.counts()['broken']
        if broken is not None:
            return broken
        follower = self.follower
        if follower is None:
            return None
        if follower.stopped is not None:
            return 'stopped following: the logs differ'
        if follower.primary_head is None or follower.heard is None:
            return 'not following yet: the primary has not been reached'
        silent = time.monotonic() - follower.heard
        if silent > follower.timeout:
            return 'nothing heard from the primary for %.0f seconds' % silent
        lag = follower.primary_head - self.log.head
        if lag > self.ready_lag:
            return ('%d entries behind the primary (READY_LAG is %d)'
                    % (lag, self.ready_lag))
        return None

    def metrics(self):
        out = _Exposition()
        log, server, counted = self.log, self.server, self.server.counted
        counts = log.counts()
        out.family('build_info', 'gauge', 'The version running, as labels.',
                   [({'version': __version__,
                      'python': sys.version.split()[0]}, 1)])
        out.family('start_time_seconds', 'gauge',
                   'When the server started, in seconds since the epoch.',
                   self.started)
        out.family('head', 'gauge', 'Entries in the log.', log.head)
        out.family('entries_appended_total', 'counter',
                   'Entries stored since the start: appended, or copied '
                   'from the primary.', counts['stored'])
        out.family('writes_refused_total', 'counter',
                   'Writes answered with an error, by reason.', [
                       ({'reason': reason}, counter.value) for reason, counter
                       in counted.refused_writes.items()] + [
                       ({'reason': 'follower'}, counts['refused']),
                       ({'reason': 'storage failed'}, counts['failed']),
                       ({'reason': 'id taken'}, counts['conflicts'])])
        out.family('idempotent_duplicates_total', 'counter',
                   'Idempotent writes not stored again: their id named an '
                   'entry stored before.', counts['duplicates'])
        out.family('idempotence_ids', 'gauge',
                   'Ids of idempotent writes remembered, of the latest '
                   'IDEMPOTENCE_WINDOW entries.', counts['keys'])
        out.family('reads_total', 'counter', 'Reads started.',
                   counted.reads.value)
        out.family('entries_sent_total', 'counter',
                   'Entries sent to readers.', counted.entries_sent.value)
        out.family('received_bytes_total', 'counter',
                   'Bytes received from clients.',
                   counted.bytes_received.value)
        out.family('sent_bytes_total', 'counter', 'Bytes sent to clients.',
                   counted.bytes_sent.value)
        out.family('connections', 'gauge', 'Connections being served.',
                   server.connections.count())
        out.family('connections_refused_total', 'counter',
                   'Connections refused, by reason.', [
                       ({'reason': reason}, counter.value) for reason, counter
                       in counted.refused_connections.items()])
        out.family('tls_handshakes_failed_total', 'counter',
                   'TLS handshakes that failed (not those of clients that '
                   'went away).', counted.handshakes_failed.value)
        out.histogram('commit_entries', 'Entries a commit stored.',
                      counts['commit_sizes'])
        out.histogram('commit_duration_seconds',
                      'Seconds a commit took: writing and flushing its '
                      'blobs and lines.', counts['commit_seconds'])
        out.histogram('flush_duration_seconds',
                      "Seconds the flush of FILE took, in a commit (with "
                      "SYNC=always): the disk's latency.",
                      counts['flush_seconds'])
        out.family('log_broken', 'gauge',
                   '1 when the log takes no writes until a restart (a '
                   'flush failed).', counts['broken'] is not None)
        self._filesystems(out)
        if self.follower is not None:
            self._following(out)
        replicas = server.replicas
        out.family('sync_replicas', 'gauge', 'SYNC_REPLICAS: followers that '
                   'must hold a write before it is acknowledged.',
                   replicas.required)
        out.family('followers_reporting', 'gauge',
                   'Followers that report what they hold.',
                   len(replicas.reported()))
        out.family('followers_in_step', 'gauge',
                   'Followers that report, and keep up with the head.',
                   replicas.in_step())
        if replicas.required:
            out.family('confirmed_head', 'gauge',
                       'Entries that SYNC_REPLICAS followers hold: those '
                       'acknowledged, and shown to readers.', replicas.head)
        return out.text()

    def _filesystems(self, out):
        free, files = [], []
        for data, path in zip(('file', 'blobs'), self.files):
            if path == MEMORY:
                continue
            where = os.path.dirname(os.path.abspath(path)) \
                if data == 'file' else path
            try:
                stat = os.statvfs(where)
            except OSError:
                continue                    # gone: nothing to say of it
            labels = {'data': data, 'path': where}
            free.append((labels, stat.f_bavail * stat.f_frsize))
            files.append((labels, stat.f_favail))
        if free:
            out.family('filesystem_avail_bytes', 'gauge',
                       'Bytes free (to the server) on the file system of '
                       'FILE and of BLOBS.', free)
            out.family('filesystem_files_avail', 'gauge',
                       'Inodes free (to the server) on the file system of '
                       'FILE and of BLOBS: a blob takes one.', files)

    def _following(self, out):
        follower = self.follower
        out.family('following', 'gauge', '1 while the follower follows; 0 '
                   'once it stopped (the logs differ).',
                   follower.stopped is None)
        primary_head = follower.primary_head
        out.family('primary_head', 'gauge', "The primary's head, as far as "
                   'the follower knows it.',
                   math.nan if primary_head is None else primary_head)
        out.family('follower_lag_entries', 'gauge', "Entries the primary "
                   "has that the follower does not (of those it knows of).",
                   math.nan if primary_head is None
                   else max(primary_head - self.log.head, 0))
        heard = follower.heard
        out.family('primary_heard_seconds', 'gauge',
                   'Seconds since the follower last heard from the primary.',
                   math.nan if heard is None else time.monotonic() - heard)


class _MetricsHandler(http.server.BaseHTTPRequestHandler):
    """Answers GET (and HEAD) of /metrics, /livez and /readyz; anything
    else is not found, and nothing changes anything."""

    server_version = 'tcplogserver/' + __version__
    timeout = _HTTP_REQUEST_SECONDS       # for each receive

    def setup(self):
        super().setup()
        self.rfile = _BoundedReader(self.rfile, _HTTP_REQUEST_BYTES)

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except _RequestTooLarge:
            self.close_connection = True
            self.send_error(431, 'request too large')

    def do_GET(self):
        self._answer(with_body=True)

    def do_HEAD(self):
        self._answer(with_body=False)

    def _answer(self, with_body):
        monitor = self.server.monitor
        path = self.path.split('?', 1)[0]
        content_type = 'text/plain; charset=utf-8'
        if path == '/metrics':
            status, text = 200, monitor.metrics()
            content_type = 'text/plain; version=0.0.4; charset=utf-8'
        elif path == '/livez':
            status, text = 200, 'ok\n'
        elif path == '/readyz':
            reason = monitor.not_ready()
            status, text = (200, 'ready\n') if reason is None \
                else (503, reason + '\n')
        else:
            status, text = 404, 'not found\n'
        body = text.encode('utf-8')
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(body)))
        self.send_header('Cache-Control', 'no-store')
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def log_message(self, format, *args):
        self.server.logger.debug('metrics request', extra={
            'remote': _remote(self.client_address),
            'request': format % args})


class _RequestTooLarge(Exception):
    pass


class _BoundedReader:
    """A request's stream, that raises _RequestTooLarge past a limit."""

    def __init__(self, stream, limit):
        self._stream, self._left = stream, limit

    def readline(self, size=-1):
        if self._left <= 0:
            raise _RequestTooLarge()
        size = self._left if size < 0 else min(size, self._left)
        line = self._stream.readline(size)
        self._left -= len(line)
        if self._left <= 0 and not line.endswith(b'\n'):
            raise _RequestTooLarge()
        return line

    def read(self, size=-1):
        return b''          # a GET has no body to read

    def close(self):
        self._stream.close()


class MetricsServer(http.server.ThreadingHTTPServer):
    """The HTTP listener of METRICS_PORT: a thread per request, at most
    ``_HTTP_CONNECTIONS`` at once, each cut off after
    ``_HTTP_REQUEST_SECONDS`` (by ``serve_forever``'s thread, which looks
    every ``poll_interval``), so that no HTTP client holds up anything
    else.  ``monitor`` is the ``Monitor`` it answers from."""

    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address, monitor, logger=None):
        self.monitor = monitor
        self.logger = logger or logging.getLogger('tcplogserver')
        self._served = {}               # request being answered -> since
        self._lock = threading.Lock()
        if ':' in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _MetricsHandler)

    def verify_request(self, request, client_address):
        with self._lock:
            if len(self._served) >= _HTTP_CONNECTIONS:
                return False
            self._served[request] = time.monotonic()
            return True

    def service_actions(self):
        # A request must be whole in time: a client that trickles its
        # bytes is cut off, whatever its pace.
        overdue = time.monotonic() - _HTTP_REQUEST_SECONDS
        with self._lock:
            late = [request for request, since in self._served.items()
                    if since < overdue]
        for request in late:
            _shutdown(request)

    def process_request(self, request, client_address):
        try:
            super().process_request(request, client_address)
        except RuntimeError:                # out of threads
            self.shutdown_request(request)

    def shutdown_request(self, request):
        try:
            super().shutdown_request(request)
        finally:
            with self._lock:
                self._served.pop(request, None)

    def handle_error(self, request, client_address):
        self.logger.debug('metrics request failed', extra={
            'remote': _remote(client_address),
            'error': _describe(sys.exc_info()[1])})

    @property
    def address(self):
        return self.socket.getsockname()[:2]


# ============================================================================
# Command line
# ============================================================================

class _UsageError(Exception):
    """A setting that cannot be used: one line for the operator, exit 2."""


# -- settings: each parsed and checked by its row's converter ----------------

def _text(text, name):
    return text


def _path_or_none(text, name):
    return text or None


def _port_number(text, name):
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise _UsageError('%s must be a number from 0 to 65535, not %r'
                          % (name, text))
    return port


def _port_or_none(text, name):
    return None if text == '' else _port_number(text, name)


def _whole_number(text, name):
    """A positive whole number."""
    return _integer(text, name, 1, 'a positive whole number')


def _count(text, name):
    """A whole number, 0 or more."""
    return _integer(text, name, 0, 'a whole number, 0 or more')


def _integer(text, name, least, what):
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise _UsageError('%s must be %s, not %r' % (name, what, text))
    return value


def _seconds(text, name, positive=False):
    """A number of seconds: 0 or more, or with ``positive`` more than 0."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    least_ok = seconds > 0 if positive else seconds >= 0
    if not (least_ok and seconds < math.inf):
        raise _UsageError('%s must be a number of seconds, not %r'
                          % (name, text))
    return seconds


def _positive_seconds(text, name):
    return _seconds(text, name, positive=True)


_SYNC_SETTINGS = {'always': True, 'never': False}


def _sync_setting(text, name):
    """True to flush before acknowledging."""
    try:
        return _SYNC_SETTINGS[text.lower()]
    except KeyError:
        raise _UsageError('%s must be always or never, not %r'
                          % (name, text)) from None


_PRIMARY_ADDRESS = re.compile(r'\[([0-9A-Fa-f:.]+)\]:([0-9]{1,5})'
                              r'|([^\s:\[\]]+):([0-9]{1,5})')


def _primary_address(text, name):
    """HOST:PORT ([HOST]:PORT for IPv6) as (host, port), or None if empty."""
    if not text:
        return None
    match = _PRIMARY_ADDRESS.fullmatch(text)
    if match is None:
        raise _UsageError('%s must be HOST:PORT ([HOST]:PORT for an IPv6 '
                          'address), not %r' % (name, text))
    host, port = match.group(1, 2) if match.group(1) else match.group(3, 4)
    if not 0 < int(port) < 65536:
        raise _UsageError('%s must name a port from 1 to 65535, not %r'
                          % (name, text))
    return host, int(port)


def _names(text, name):
    """A comma-separated list of names, as a frozenset; None if empty."""
    names = frozenset(part.strip() for part in text.split(',')
                      if part.strip())
    return names or None


def _log_level(text, name):
    try:
        return _LEVEL_NAMES[text.lower()]
    except KeyError:
        raise _UsageError('%s must be one of %s, not %r'
                          % (name, ', '.join(_LEVEL_NAMES), text)) from None


class _Setting(collections.namedtuple(
        '_Setting', ('option', 'variable', 'default', 'convert', 'help'))):
    """A setting: its option, its environment variable, its default (as
    text, as the environment gives it), the function from text to its
    value (raising _UsageError), and its help."""

    __slots__ = ()


_SETTINGS = (
    _Setting('--host', 'HOST', '127.0.0.1', _text,
             'address to listen on; 0.0.0.0 or :: for every interface'),
    _Setting('--port', 'PORT', '8089', _port_number,
             'TCP port; 0 picks a free one'),
    _Setting('--file', 'FILE', '.tcp-log-server.file', _text,
             'the log (one hash line per entry), or "memory"'),
    _Setting('--blobs', 'BLOBS', '.tcp-log-server.blobs', _text,
             'directory of entry blobs named by hash, or "memory"'),
    _Setting('--sync', 'SYNC', 'always', _sync_setting,
             'always: acknowledge a write once it is on stable storage; '
             'never: once the operating system has it (faster, but a power '
             'loss can take acknowledged writes)'),
    _Setting('--sync-replicas', 'SYNC_REPLICAS', '0', _count,
             'followers that must hold a write durably before it is '
             'acknowledged (and shown to readers); 0: acknowledge a write '
             'once it is durable here'),
    _Setting('--idempotence-window', 'IDEMPOTENCE_WINDOW',
             str(IDEMPOTENCE_WINDOW), _count,
             'entries whose idempotent writes\' ids are remembered: a write '
             'sent again with the id of one of them is not stored again; 0: '
             'keep no ids'),
    _Setting('--stop-timeout', 'STOP_TIMEOUT', '%g' % Server.stop_timeout,
             _seconds,
             'seconds a stopping server waits for clients to take their last '
             'replies before cutting them off'),
    _Setting('--max-line', 'MAX_LINE', str(Server.max_line), _whole_number,
             'bytes a message line may hold; a longer one gets "message too '
             'large" and its connection is closed'),
    _Setting('--max-connections', 'MAX_CONNECTIONS',
             str(Server.max_connections), _whole_number,
             'connections served at once; one more gets "too many '
             'connections" and is closed'),
    _Setting('--max-connections-per-client', 'MAX_CONNECTIONS_PER_CLIENT',
             str(Server.max_connections_per_client), _whole_number,
             'connections served at once from one client (one address, or '
             'one client certificate name with TLS_CA); one more is refused '
             'as one over MAX_CONNECTIONS'),
    _Setting('--tls-cert', 'TLS_CERT', '', _path_or_none,
             'certificate chain (PEM) to serve TLS with: with TLS_KEY set '
             'too, the server speaks only TLS, 1.2 or newer'),
    _Setting('--tls-key', 'TLS_KEY', '', _path_or_none,
             'the private key (PEM) of TLS_CERT'),
    _Setting('--tls-ca', 'TLS_CA', '', _path_or_none,
             'CA certificates (PEM): clients must present a certificate that '
             'one of them signed (mutual TLS)'),
    _Setting('--tls-appenders', 'TLS_APPENDERS', '', _names,
             'client certificate names (commonName or DNS subjectAltName), '
             'with commas: only these may append; other clients TLS_CA '
             'vouches for may read'),
    _Setting('--tls-handshake-timeout', 'TLS_HANDSHAKE_TIMEOUT',
             '%g' % Server.handshake_timeout, _positive_seconds,
             'seconds a client has to finish the TLS handshake before it is '
             'closed'),
    _Setting('--follow', 'FOLLOW', '', _primary_address,
             'HOST:PORT of a primary to follow: the server copies its log, '
             'serves reads of it, and refuses writes'),
    _Setting('--follow-timeout', 'FOLLOW_TIMEOUT', '10', _positive_seconds,
             'seconds a follower waits for a silent primary (probing it '
             'after a third of them) before connecting again'),
    _Setting('--follow-tls-cert', 'FOLLOW_TLS_CERT', '', _path_or_none,
             'a client certificate (PEM) to present to the primary; any '
             'FOLLOW_TLS setting makes the follower use TLS'),
    _Setting('--follow-tls-key', 'FOLLOW_TLS_KEY', '', _path_or_none,
             'the private key (PEM) of FOLLOW_TLS_CERT'),
    _Setting('--follow-tls-ca', 'FOLLOW_TLS_CA', '', _path_or_none,
             "CA certificates (PEM) to check the primary's certificate with, "
             "instead of the system's"),
    _Setting('--metrics-port', 'METRICS_PORT', '', _port_or_none,
             'TCP port of an HTTP listener for /metrics (Prometheus), '
             '/livez and /readyz; 0 picks a free one; off unless set'),
    _Setting('--metrics-host', 'METRICS_HOST', '127.0.0.1', _text,
             'address the METRICS_PORT listener listens on'),
    _Setting('--ready-lag', 'READY_LAG', str(_READY_LAG), _count,
             'entries a follower may be behind its primary and still be '
             'ready (/readyz)'),
    _Setting('--log-level', 'LOG_LEVEL', 'info', _log_level,
             'one of ' + ', '.join(_LEVEL_NAMES)),
)

_SERVER_SETTINGS = tuple(setting.variable for setting in _SETTINGS)
_CLIENT_SETTINGS = ('HOST', 'PORT', 'TLS_CERT', 'TLS_KEY', 'TLS_CA')
_FILE_SETTINGS = ('FILE', 'BLOBS')
_BACKUP_SETTINGS = _CLIENT_SETTINGS + _FILE_SETTINGS

# Help for the settings a command uses where it differs from the server's.
_CLIENT_HELP = {
    'HOST': "the server's address",
    'PORT': "the server's TCP port",
    'TLS_CERT': ('a client certificate (PEM) to present to a server that '
                 'asks for one; any TLS setting makes the client use TLS'),
    'TLS_KEY': 'the private key (PEM) of TLS_CERT',
    'TLS_CA': ("CA certificates (PEM) to check the server's certificate "
               "with, instead of the system's"),
}
_BACKUP_HELP = dict(_CLIENT_HELP, HOST="the primary's address",
                    PORT="the primary's TCP port",
                    FILE='the backup: its log (made if missing)',
                    BLOBS='the backup: its blobs (made if missing)')


def _settings(args, variables):
    """The values of the settings named, from the options (or the
    environment, or the defaults), each converted and checked by its row:
    an argparse.Namespace with the variables' names in lower case."""
    values = argparse.Namespace()
    for setting in _SETTINGS:
        if setting.variable in variables:
            name = setting.variable.lower()
            setattr(values, name, setting.convert(getattr(args, name),
                                                  setting.variable))
    return values


def _parser():
    command = os.path.basename(sys.argv[0])
    parser = argparse.ArgumentParser(
        prog=('python3 -m tcplogserver'
              if command in ('__main__.py', 'tcplogserver.py', '-c', '')
              else command),
        description='Serve an append-only log over TCP, compatible with the '
                    'Node.js tcp-log-server (with no COMMAND), or work on '
                    'its files.  Each option may also be set by the '
                    'environment variable named beside it; the option wins.  '
                    'Logs are JSON lines (pino) on standard output.')
    parser.add_argument('--version', action='version', version=__version__)
    for setting in _SETTINGS:
        parser.add_argument(
            setting.option, metavar=setting.variable,
            default=os.environ.get(setting.variable, setting.default),
            help='%s (env %s, default %s)'
                 % (setting.help, setting.variable,
                    setting.default or 'none'))
    commands = parser.add_subparsers(dest='command', metavar='COMMAND',
                                     title='commands')
    _add_command(
        commands, 'verify', 'check the log and its blobs (reads only)',
        'Check, reading only, that every line of FILE is a hash and that the '
        'blob it names is in BLOBS and hashes to that name.  Prints a '
        'summary; exit status 0 when all is whole, 1 when anything is not, '
        '2 when FILE or BLOBS cannot be read.')
    append = _add_command(
        commands, 'append', 'append entries, print their indices',
        'Append each JSON argument as an entry, or, with none, each line of '
        'standard input (NDJSON); print the index of each, in order.  '
        'Entries that fail are reported on standard error, and the exit '
        'status is then 1.')
    append.add_argument('entries', nargs='*', metavar='JSON',
                        help='an entry: a JSON object, array or null')
    tail = _add_command(
        commands, 'tail', 'print entries as NDJSON',
        'Print entries from index N to the head, one {"index":N,"entry":...} '
        'line each; with --follow, go on printing entries as they are '
        'appended until interrupted (exit status 0).  Entries that cannot '
        'be read are reported on standard error, and the exit status is '
        'then 1.')
    tail.add_argument('--from', dest='start', metavar='N', default='1',
                      help='the first index to print (default 1)')
    tail.add_argument('-f', '--follow', action='store_true',
                      help='go on printing new entries, like tail -f')
    _add_command(
        commands, 'backup', "copy a server's log into FILE and BLOBS",
        'Copy the entries of the server at HOST port PORT, up to its head '
        'when the copy starts, into FILE and BLOBS, durably, with ordinary '
        'reads; print how many were copied.  Run again on the same files, '
        'it copies only what is new.  Exit status 0 once copied; 1 if the '
        'copy could not be finished (what was copied stays: run again) or '
        'FILE holds another log; 2 when FILE or BLOBS cannot be used.',
        _BACKUP_HELP)
    return parser


def _add_command(commands, name, summary, description, helps=_CLIENT_HELP):
    """A command, with the options of the settings it uses."""
    command = commands.add_parser(name, help=summary, description=description)
    for setting in _SETTINGS:
        if setting.variable in _COMMANDS[name][1]:
            # SUPPRESS keeps a value given before the command, or the
            # environment's, unless the option is given again here.
            command.add_argument(
                setting.option, metavar=setting.variable,
                default=argparse.SUPPRESS,
                help='%s (env %s, default %s)'
                     % (helps.get(setting.variable, setting.help),
                        setting.variable, setting.default or 'none'))
    return command


def main(argv=None):
    """Run the command line; return the exit status."""
    args = _parser().parse_args(argv)
    run, variables = _COMMANDS[args.command]
    try:
        return run(args, _settings(args, variables))
    except _UsageError as error:
        print('tcplogserver: error: %s' % error, file=sys.stderr)
        return 2
    except KeyboardInterrupt:           # Ctrl-C during a command
        return 130


# -- the server -----------------------------------------------------------

def _serve(args, settings):
    """Run the server until SIGTERM or SIGINT."""
    logger = _server_logger(settings.log_level)
    tls = _server_tls(settings)
    connect = _primary_connector(settings)
    refusal = None
    if connect is not None:
        refusal = 'this server follows %s: append there' % _host_and_port(
            settings.follow)
        if settings.sync_replicas:
            raise _UsageError('SYNC_REPLICAS is for a primary, and a follower '
                              'takes no writes: start it without FOLLOW to '
                              'promote it')
    made = []               # what this start made, to remove if it fails
    try:
        log = _open_log(settings, logger, made, refuse_appends=refusal,
                        idempotence_window=settings.idempotence_window)
        try:
            _raise_descriptor_limit(settings.max_connections, logger)
            server = _listen(settings, log, logger, tls)
            try:
                metrics = _listen_for_metrics(settings, logger)
            except BaseException:
                server.server_close()
                raise
        except BaseException:
            log.close()
            raise
    except BaseException:
        _remove_made(made)
        raise
    server.stop_timeout = settings.stop_timeout
    server.max_line = settings.max_line
    server.max_connections = settings.max_connections
    server.max_connections_per_client = settings.max_connections_per_client
    server.appenders = settings.tls_appenders
    server.handshake_timeout = settings.tls_handshake_timeout
    server.sync_replicas = settings.sync_replicas
    follower = None if connect is None else Follower(
        log, connect, _host_and_port(settings.follow),
        settings.follow_timeout, logger=logger,
        name=_follower_name(settings.file))
    monitor = Monitor(server, follower, (settings.file, settings.blobs),
                      settings.ready_lag)
    if metrics is not None:
        metrics.monitor = monitor
    _run(server, log, logger, settings, follower, monitor, metrics)
    return 0


def _listen_for_metrics(settings, logger):
    """The MetricsServer METRICS_PORT asks for (its monitor yet to be
    given), or None."""
    if settings.metrics_port is None:
        return None
    try:
        return MetricsServer((settings.metrics_host, settings.metrics_port),
                             None, logger)
    except OSError as error:
        raise _UsageError('cannot listen on METRICS_HOST %s port %s: %s'
                          % (settings.metrics_host, settings.metrics_port,
                             _describe(error))) from None


def _server_logger(level):
    """The server's logger: pino's JSON lines on standard output."""
    logger = logging.getLogger('tcplogserver')
    logger.setLevel(level)
    logger.propagate = False
    output = logging.StreamHandler(sys.stdout)
    output.setFormatter(PinoFormatter())
    logger.addHandler(output)
    return logger


def _open_log(settings, logger, made, sync=None, refuse_appends=None,
              idempotence_window=IDEMPOTENCE_WINDOW):
    """The Log the settings name; _UsageError when a path cannot be used.

    What it makes on the way (folders, a new FILE) is added to ``made``.
    """
    what = 'BLOBS'
    try:
        if settings.blobs == MEMORY:
            blobs = MemoryBlobs()
        else:
            _make_folders(settings.blobs, made)
            blobs = FileBlobs(settings.blobs, create=False)
        what = 'FILE'
        if settings.file != MEMORY:
            if os.path.dirname(settings.file):
                _make_folders(os.path.dirname(settings.file), made)
            if not os.path.lexists(settings.file):
                made.append(settings.file)
        return Log(settings.file, blobs,
                   sync=settings.sync if sync is None else sync,
                   logger=logger, refuse_appends=refuse_appends,
                   idempotence_window=idempotence_window)
    except OSError as error:
        path = settings.blobs if what == 'BLOBS' else settings.file
        raise _UsageError('cannot use %s %s: %s'
                          % (what, path, _describe(error))) from None
    except LogError as error:
        raise _UsageError(str(error)) from None


def _remove_made(made):
    """Undo a start-up that failed: remove the folders it made, and FILE
    if it made it, as long as each is still empty."""
    for path in reversed(made):
        try:
            if os.path.isdir(path):
                os.rmdir(path)
            elif os.path.getsize(path) == 0:
                os.unlink(path)
        except OSError:
            pass                        # not empty, or already gone


def _listen(settings, log, logger, tls):
    """A Server on the settings' address, or on the socket systemd passed."""
    inherited = _inherited_socket()
    try:
        if inherited is None:
            return Server((settings.host, settings.port), log, logger,
                          tls=tls)
        server = Server(inherited.getsockname()[:2], log, logger,
                        bind_and_activate=False, tls=tls)
    except OSError as error:
        raise _UsageError('cannot listen on %s port %s: %s'
                          % (settings.host, settings.port,
                             _describe(error))) from None
    server.socket.close()
    server.socket = inherited
    logger.info('serving on the socket systemd passed; HOST and PORT are '
                'not used')
    return server


def _run(server, log, logger, settings, follower=None, monitor=None,
         metrics=None):
    """Serve (and follow, and answer for metrics) until a signal, then
    stop gracefully."""
    stop = threading.Event()

    def on_signal(number, frame):
        _notify('STOPPING=1', logger)
        logger.info('stopping', extra={'signal': signal.Signals(number).name})
        # A second signal is not caught: it ends the process at once.  The
        # log stays whole: a torn last line is cut at the next start.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    accepting = _thread_without_signals(server.serve_forever, 'accept')
    answering = None if metrics is None else _thread_without_signals(
        metrics.serve_forever, 'metrics')
    # Started before the listening record, so that once the server says it
    # listens every thread it starts is running; it logs only after it.
    listening = threading.Event()
    tidying = _thread_without_signals(
        lambda: listening.wait() and _remove_unfinished(
            log.blobs, logger, stop.is_set), 'tidy')
    host, port = server.address
    logger.info('listening', extra={
        'address': host, 'port': port, 'file': settings.file,
        'blobs': settings.blobs, 'sync': 'always' if log.sync else 'never',
        'sync_replicas': server.sync_replicas,
        'idempotence_window': log.idempotence_window,
        'stop_timeout': server.stop_timeout, 'max_line': server.max_line,
        'max_connections': server.max_connections,
        'max_connections_per_client': server.max_connections_per_client,
        'tls_appenders': None if server.appenders is None
        else sorted(server.appenders),
        'tls': 'off' if server.tls is None
        else 'mutual' if settings.tls_ca else 'on',
        'tls_handshake_timeout': server.handshake_timeout,
        'head': log.head, **({} if metrics is None else {
            'metrics': _host_and_port(metrics.address)}),
        **({} if follower is None else {
            'follow': follower.primary,
            'follow_timeout': follower.timeout,
            'follow_tls': 'on' if _follow_tls_settings(settings)
            else 'off'})})
    _notify('READY=1\nSTATUS=listening on %s port %d; %d entries'
            % (host, port, log.head), logger)
    listening.set()
    if monitor is not None:
        monitor.serving = True
    if follower is not None:
        follower.start()
    stop.wait()
    if monitor is not None:
        monitor.serving = False         # not ready: stopping
    if follower is not None:
        follower.stop()
    server.shutdown()
    accepting.join()
    server.server_close()
    if metrics is not None:
        metrics.shutdown()
        answering.join()
        metrics.server_close()
    tidying.join()
    log.close()
    logger.info('stopped', extra={'head': log.head})


def _thread_without_signals(target, name, daemon=None):
    """Start a thread that blocks SIGTERM and SIGINT.

    The kernel gives a signal to any thread that does not block it, and
    only the main thread runs Python's handlers: blocked in a wait, it
    would not notice.  (A thread takes the mask of the thread that starts
    it.)
    """
    stopping = {signal.SIGTERM, signal.SIGINT}
    thread = threading.Thread(target=target, name=name, daemon=daemon)
    signal.pthread_sigmask(signal.SIG_BLOCK, stopping)
    try:
        thread.start()
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stopping)
    return thread


def _remove_unfinished(blobs, logger, stopping):
    """Remove what blobs being written when the server died left behind;
    while the server serves, since in a folder of millions of blobs the
    search takes a while."""
    try:
        removed = blobs.remove_unfinished(stopping)
    except OSError as error:
        logger.warning('cannot remove unfinished blob files', extra={
            'error': _describe(error)})
        return
    if removed:
        logger.info('removed unfinished blob files, left by a crash; no '
                    'acknowledged entry was in them',
                    extra={'removed': removed})


# Descriptors the server needs beside one per connection and one per blob of
# a commit: its files, the listening socket, standard streams, and a
# connection or two being refused.
_SPARE_DESCRIPTORS = 64


def _raise_descriptor_limit(connections, logger):
    """Let the process open a descriptor for every connection allowed,
    and for every blob of a commit (each is open until the commit ends).

    The usual soft limit, 1024, is below what the defaults need; raising it
    up to the hard limit needs no privilege.
    """
    needed = connections + _MAX_BATCH + _SPARE_DESCRIPTORS
    soft = None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY or soft >= needed:
            return
        wanted = needed if hard == resource.RLIM_INFINITY \
            else min(needed, hard)
        if wanted > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    except (OSError, ValueError) as error:
        logger.warning('cannot raise the limit on open files', extra={
            'limit': soft, 'needed': needed, 'error': _describe(error)})
        return
    if wanted < needed:
        logger.warning('the limit on open files is below what '
                       'MAX_CONNECTIONS and a full commit need', extra={
                           'limit': wanted, 'needed': needed})


def _server_tls(settings):
    """The server's TLS context, if the settings ask for TLS."""
    if settings.tls_appenders is not None and not settings.tls_ca:
        raise _UsageError('TLS_APPENDERS needs TLS_CA: without client '
                          'certificates no client has a name to be allowed '
                          'by')
    if not _tls_settings(settings):
        return None
    if not (settings.tls_cert and settings.tls_key):
        raise _UsageError('TLS needs both TLS_CERT and TLS_KEY')
    try:
        return server_tls_context(settings.tls_cert, settings.tls_key,
                                  settings.tls_ca)
    except OSError as error:
        raise _UsageError('cannot serve TLS with %s: %s'
                          % (_tls_settings(settings), _describe(error))
                          ) from None


def _tls_settings(settings):
    """The TLS settings given, for a message; empty if none is."""
    return ', '.join('%s %s' % (name, value) for name, value in (
        ('TLS_CERT', settings.tls_cert), ('TLS_KEY', settings.tls_key),
        ('TLS_CA', settings.tls_ca)) if value)


def _host_and_port(address):
    host, port = address
    return '%s:%d' % ('[%s]' % host if ':' in host else host, port)


def _follower_name(file):
    """How a follower introduces itself to its primary: its host and its
    FILE, the same after a restart (an in-memory log's is new)."""
    if file == MEMORY:
        return '%s:memory:%s' % (socket.gethostname(), os.urandom(4).hex())
    return '%s:%s' % (socket.gethostname(), os.path.realpath(file))


def _follow_tls_settings(settings):
    """The FOLLOW_TLS settings given, for a message; empty if none is."""
    return ', '.join('%s %s' % (name, value) for name, value in (
        ('FOLLOW_TLS_CERT', settings.follow_tls_cert),
        ('FOLLOW_TLS_KEY', settings.follow_tls_key),
        ('FOLLOW_TLS_CA', settings.follow_tls_ca)) if value)


def _client_tls(given, ca, cert, key):
    """A client's TLS context, if any TLS setting is ``given`` (their
    description, for the message if they cannot be used)."""
    if not given:
        return None
    try:
        return client_tls_context(ca, cert, key)
    except OSError as error:
        raise _UsageError('cannot use TLS with %s: %s'
                          % (given, _describe(error))) from None


def _primary_connector(settings):
    """A function that connects to the primary FOLLOW names, or None."""
    if settings.follow is None:
        return None
    if settings.follow_tls_key and not settings.follow_tls_cert:
        raise _UsageError('FOLLOW_TLS_KEY needs FOLLOW_TLS_CERT, the '
                          'certificate it is the key of')
    tls = _client_tls(_follow_tls_settings(settings), settings.follow_tls_ca,
                      settings.follow_tls_cert, settings.follow_tls_key)
    host, port = settings.follow
    return Client(host, port, timeout=settings.follow_timeout,
                  tls=tls).connect


def _client(settings, **options):
    """The Client the settings describe."""
    tls = _client_tls(_tls_settings(settings), settings.tls_ca,
                      settings.tls_cert, settings.tls_key)
    return Client(settings.host, settings.port, tls=tls, **options)


# The first file descriptor systemd passes (SD_LISTEN_FDS_START).
_LISTEN_FDS_START = 3


def _inherited_socket():
    """The listening socket systemd passed (socket activation), or None.

    The variables are removed, as sd_listen_fds does, so that no process
    started later takes them for its own.
    """
    pid = os.environ.pop('LISTEN_PID', None)
    count = os.environ.pop('LISTEN_FDS', None)
    os.environ.pop('LISTEN_FDNAMES', None)
    if pid != str(os.getpid()) or not count or int(count) < 1:
        return None
    return socket.socket(fileno=_LISTEN_FDS_START)


def _notify(message, logger):
    """Tell systemd how the server is going, if it asked (Type=notify)."""
    address = os.environ.get('NOTIFY_SOCKET')
    if not address:
        return
    if address.startswith('@'):
        address = '\0' + address[1:]      # an abstract socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(message.encode('utf-8'))
    except OSError as error:
        logger.warning('could not notify systemd', extra={
            'socket': os.environ['NOTIFY_SOCKET'], 'error': _describe(error)})


def _verify(args, settings):
    """Check FILE and BLOBS; print what was found."""
    for variable, path in (('FILE', settings.file), ('BLOBS', settings.blobs)):
        if path == MEMORY:
            raise _UsageError('%s=memory: nothing outlives the server, so '
                              'there is nothing to verify' % variable)
    try:
        blobs = FileBlobs(settings.blobs, create=False)
    except OSError as error:
        raise _UsageError('cannot use BLOBS %s: %s'
                          % (settings.blobs, _describe(error))) from None
    progress = _Progress(sys.stderr) if sys.stderr.isatty() else None
    started = time.monotonic()
    try:
        report = verify(settings.file, blobs, progress=progress)
    except OSError as error:
        raise _UsageError('cannot read FILE %s: %s'
                          % (settings.file, _describe(error))) from None
    finally:
        blobs.close()
        if progress is not None:
            progress.clear()
    took = time.monotonic() - started
    print('FILE %s, BLOBS %s' % (settings.file, settings.blobs))
    print('entries: %d' % report.entries)
    print('distinct blobs: %d' % report.blobs)
    if report.unfinished:
        print('unfinished blob files: %d (left by a crash, holding no '
              'acknowledged entry; the server removes them when it starts)'
              % report.unfinished)
    print('checked in %.1f s (%d entries/s)'
          % (took, report.entries / max(took, 1e-3)))
    if report.ok:
        print('problems: none')
        return 0
    print('problems: %d' % sum(report.problems.values()))
    for kind, count in report.problems.items():
        print('  %s: %d' % (kind, count))
        for index, message in report.examples[kind]:
            print('    entry %d: %s' % (index, message))
        if count > len(report.examples[kind]):
            print('    ...')
    return 1


def _append(args, settings):
    """Append entries from the arguments or standard input; print indices."""
    if args.entries:
        # As the bytes given: text that is not UTF-8 is invalid JSON.
        texts = (('argument %d' % number, os.fsencode(text))
                 for number, text in enumerate(args.entries, 1))
    else:
        texts = (('line %d' % number, line)
                 for number, line in enumerate(sys.stdin.buffer, 1)
                 if line.strip(_JSON_SPACE))
    # At a terminal each line is answered at once; otherwise writes are
    # pipelined, a window of them awaiting acknowledgement at a time.
    window = 1 if not args.entries and sys.stdin.isatty() else _APPEND_WINDOW
    places = collections.deque()    # where each entry sent came from

    def entries():
        for where, text in texts:
            places.append(where)
            yield text
    failures = 0
    try:
        with _client(settings) as client:
            for result in client.append_each(entries(), window,
                                             as_json=True):
                where = places.popleft()
                if type(result) is int:
                    print(result, flush=window == 1)
                    continue
                failures += 1
                print('tcplogserver: %s: %s' % (
                    where, 'invalid JSON' if isinstance(result, ValueError)
                    else result), file=sys.stderr)
    except BrokenPipeError:
        _quiet_stdout()             # append | head: the reader has enough
    except (OSError, ClientError) as error:
        raise _UsageError('cannot append to the server at %s port %d: %s'
                          % (settings.host, settings.port, _describe(error))
                          ) from None
    return 1 if failures else 0


def _tail(args, settings):
    """Print entries as NDJSON, to the head or, following, until stopped."""
    try:
        start = int(args.start)
    except ValueError:
        start = 0
    if start < 1:
        raise _UsageError('--from must be a positive integer, not %r'
                          % args.start)
    output = sys.stdout.buffer
    unreadable = 0
    server = 'the server at %s port %d' % (settings.host, settings.port)
    # Following, a restarting server is waited for; otherwise a few tries.
    client = _client(settings, retries=None if args.follow else _TAIL_RETRIES)
    try:
        with client.read(start, args.follow) as reader:
            reader.on_lost = lambda error: print(
                'tcplogserver: lost %s (%s); trying again'
                % (server, _describe(error)), file=sys.stderr, flush=True)
            reader.on_back = lambda: print(
                'tcplogserver: %s is back; reading on from entry %d'
                % (server, reader.next_index), file=sys.stderr, flush=True)
            # SIGINT or SIGTERM ends it like the end of the log: cleanly,
            # rather than by an exception at whatever point it is.
            for number in (signal.SIGINT, signal.SIGTERM):
                signal.signal(number, lambda number, frame: reader.interrupt())
            for index, entry in reader:
                if isinstance(entry, ReadError):
                    unreadable += 1
                    print('tcplogserver: %s' % entry, file=sys.stderr)
                    continue
                output.write(b'{"index":%d,"entry":%s}\n'
                             % (index, canonical_json(entry)))
                if args.follow:
                    output.flush()
        output.flush()
    except BrokenPipeError:
        _quiet_stdout()             # tail | head: the reader has enough
    except (OSError, ClientError) as error:
        raise _UsageError('cannot read from %s: %s'
                          % (server, _describe(error))) from None
    return 1 if unreadable else 0


def _quiet_stdout():
    # Whoever read standard output has gone: end quietly, and keep the
    # interpreter from failing to flush it at exit.
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _backup(args, settings):
    """Copy the server's log, up to its head, into FILE and BLOBS."""
    for variable, path in (('FILE', settings.file), ('BLOBS', settings.blobs)):
        if path == MEMORY:
            raise _UsageError('%s=memory: a backup must outlive the command'
                              % variable)
    logger = logging.getLogger('tcplogserver.backup')
    logger.propagate = False
    made = []
    log = _open_log(settings, logger, made, sync=True)
    try:
        follower = Follower(log, _client(settings).connect, '%s port %d'
                            % (settings.host, settings.port), logger=logger)
        try:
            copied = follower.copy_to_head()
        except (OSError, ValueError, LogError, ClientError) as error:
            print('tcplogserver: backup from %s port %d stopped with %d '
                  'entries in %s: %s' % (settings.host, settings.port,
                                         log.head, settings.file,
                                         _describe(error)), file=sys.stderr)
            log.close()
            _remove_made(made)      # if nothing was copied into them
            return 1
    finally:
        log.close()
    print("%d %s copied; the backup's head is %d" % (
        copied, 'entry' if copied == 1 else 'entries', log.head))
    return 0


# What each command runs, and the settings it uses (None: the server).
_COMMANDS = {None: (_serve, _SERVER_SETTINGS),
             'verify': (_verify, _FILE_SETTINGS),
             'append': (_append, _CLIENT_SETTINGS),
             'tail': (_tail, _CLIENT_SETTINGS),
             'backup': (_backup, _BACKUP_SETTINGS)}


class _Progress:
    """verify's progress, on one line of a terminal, rewritten as it goes."""

    def __init__(self, stream):
        self.stream = stream
        self.shown = ''

    def __call__(self, done, total):
        self.shown = 'verify: %d of %d entries (%d%%)' % (
            done, total, 100 * done // max(total, 1))
        self.stream.write('\r' + self.shown)
        self.stream.flush()

    def clear(self):
        if self.shown:
            self.stream.write('\r%s\r' % (' ' * len(self.shown)))
            self.stream.flush()


if __name__ == '__main__':
    sys.exit(main())
