"""The SQLite output database ``<outdir>/luaprobe.sqlite`` (schema: docs/schema.md).

Write side: :class:`StoreWriter` keeps SQLite off the packet hot path.  ``write(kind, rows)`` only
appends to an in-memory batch; a full batch is msgpack-encoded and written to a **non-blocking** pipe
whose unsent tail stays in a backlog (the caller blocks only when the backlog passes
``max_backlog_bytes``, i.e. when the writer cannot keep up at all).  The SQLite work happens in a
separate process (``python -m luaprobe.engine.store.writer --serve PATH``) that applies batches inside transactions
and commits when its input goes idle, every ``COMMIT_ROWS`` rows or every ``COMMIT_SECS`` seconds.

Wire protocol (parent -> writer, a stream of msgpack arrays on the writer's stdin):
    ["w", kind, rows]    rows of one kind
    ["b", kind, rows]    rows of one kind built by the engine with the right arity and value types (str, int, float,
                         None; no bytes): inserted without the per-row check (``write(..., built=True)``)
    ["s", seq]           commit, then answer ["ack", seq, error_or_None]
    ["c"]                commit, close the database, answer ["done", report], exit
Writer -> parent (stdout): ["ready"] | ["fatal", message] | ["ack", seq, error] | ["done", report].

The writer never exits silently with data in flight: bad rows are counted and reported, a fatal
SQLite error (disk full, read-only, I/O) stops writing and is reported, and ``close()`` raises
:class:`StoreError` for either.  The writer exits when its stdin reaches EOF (the parent closed it
or died) or when its parent pid changes (the pipe may survive in a forked sibling); SIGINT, SIGHUP and
SIGTERM are ignored (a signal to the whole process group is the fast path's to handle: it stops, then closes
the pipe).  An orphan (its parent killed) commits the rows it was handed and exits at its pipe's EOF; it holds the
output directory's lock (``--lock-fd``, inherited) until then, so no other run touches the database meanwhile.

Read side: :class:`Store` opens the database read-only (works while a run is still writing, WAL).
"""
from __future__ import annotations

import collections
import errno
import json
import os
import re
import select
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.parse

import msgpack

from luaprobe.engine.store import meters
from luaprobe.shm.exits import describe_exit

DB_NAME = "luaprobe.sqlite"
SCHEMA_VERSION = 2         # 2: flows rows have their own id (was primary key (flowkey, first_ts))

COMMIT_ROWS = 200_000      # writer: commit at least this often (rows)
CACHE_KIB = 65536          # writer: page cache (KiB); holds the flows index of ~1M rows, see _Writer
COMMIT_SECS = 1.0          # writer: ... and this often (seconds of continuous input)
IDLE_COMMIT_SECS = 0.05    # writer: commit when the input is idle this long
MAX_ERRORS_KEPT = 20       # writer: bad-row messages kept for the report

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS counter_groups (
    guid        TEXT PRIMARY KEY,
    name        TEXT,
    description TEXT,
    bucketsize  INTEGER,
    meters_json TEXT
);
CREATE INDEX IF NOT EXISTS counter_groups_name ON counter_groups (name COLLATE NOCASE);
CREATE TABLE IF NOT EXISTS counters (
    group_guid TEXT    NOT NULL,
    bucket_ts  INTEGER NOT NULL,
    key        TEXT    NOT NULL,
    meter      INTEGER NOT NULL,
    value      NUMERIC NOT NULL,
    vartype    INTEGER,
    total      NUMERIC,
    divisor    NUMERIC,
    sample_us  INTEGER,
    PRIMARY KEY (group_guid, bucket_ts, key, meter)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_info (
    group_guid  TEXT NOT NULL,
    key         TEXT NOT NULL,
    label       TEXT,
    description TEXT,
    PRIMARY KEY (group_guid, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts (
    id             INTEGER PRIMARY KEY,
    ts_sec         INTEGER,
    ts_usec        INTEGER,
    alert_guid     TEXT NOT NULL,
    flowkey        TEXT,
    sigid          TEXT,
    classification TEXT,
    priority       INTEGER,
    message        TEXT,
    status         TEXT,
    plugin         TEXT
);
CREATE INDEX IF NOT EXISTS alerts_guid_ts ON alerts (alert_guid, ts_sec, ts_usec);
CREATE TABLE IF NOT EXISTS resources (
    id            INTEGER PRIMARY KEY,
    ts_sec        INTEGER,
    ts_usec       INTEGER,
    resource_guid TEXT NOT NULL,
    flowkey       TEXT,
    uri           TEXT,
    contents,
    plugin        TEXT
);
CREATE INDEX IF NOT EXISTS resources_guid_ts ON resources (resource_guid, ts_sec, ts_usec);
CREATE TABLE IF NOT EXISTS fts (
    id       INTEGER PRIMARY KEY,
    ts_sec   INTEGER,
    ts_usec  INTEGER,
    fts_guid TEXT NOT NULL,
    flowkey  TEXT,
    text     TEXT,
    plugin   TEXT
);
CREATE INDEX IF NOT EXISTS fts_guid_ts ON fts (fts_guid, ts_sec, ts_usec);
CREATE TABLE IF NOT EXISTS flows (
    id         INTEGER PRIMARY KEY,
    flowkey    TEXT NOT NULL,
    proto      INTEGER,
    ipa        TEXT,
    porta      INTEGER,
    ipz        TEXT,
    portz      INTEGER,
    first_ts   REAL NOT NULL,
    last_ts    REAL,
    packets_az INTEGER,
    packets_za INTEGER,
    bytes_az   INTEGER,
    bytes_za   INTEGER,
    state      TEXT,
    tags       TEXT,
    setup_rtt_us INTEGER,
    retrans_az INTEGER,
    retrans_za INTEGER
);
CREATE TABLE IF NOT EXISTS decl_groups (
    kind        TEXT NOT NULL,
    guid        TEXT NOT NULL,
    name        TEXT,
    description TEXT,
    PRIMARY KEY (kind, guid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS edges (
    id      INTEGER PRIMARY KEY,
    ts_sec  INTEGER,
    s_guid  TEXT NOT NULL,
    s_key   TEXT,
    t_guid  TEXT NOT NULL,
    t_key   TEXT,
    flowkey TEXT,
    plugin  TEXT
);
CREATE TABLE IF NOT EXISTS flow_toppers (
    tracker   TEXT NOT NULL,
    bucket_ts INTEGER NOT NULL,
    rank      INTEGER NOT NULL,
    flowkey   TEXT,
    metric    NUMERIC,
    PRIMARY KEY (tracker, bucket_ts, rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS flow_topper_parts (
    tracker   TEXT NOT NULL,
    bucket_ts INTEGER NOT NULL,
    shard     INTEGER NOT NULL,
    rank      INTEGER NOT NULL,
    flowkey   TEXT,
    metric    NUMERIC,
    count     INTEGER,
    PRIMARY KEY (tracker, bucket_ts, shard, rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run (
    key   TEXT PRIMARY KEY,
    value TEXT
);
"""

# kind -> (number of columns, INSERT statement).  GUIDs are upper-cased by SQLite's upper().
#: the columns of a flows row as the engine writes it (SCHEMA's flows table without id; docs/schema.md), in the
#: order of a stored row (engine/fastpath/flowrows.py): the writer's INSERT, the schema-1 rebuild and the query side
FLOW_COLUMNS = ("flowkey", "proto", "ipa", "porta", "ipz", "portz", "first_ts", "last_ts", "packets_az", "packets_za",
                "bytes_az", "bytes_za", "state", "tags", "setup_rtt_us", "retrans_az", "retrans_za")
_FLOW_COLS = ", ".join(FLOW_COLUMNS)

_SQL = {
    "counters": (9, "INSERT INTO counters (group_guid, bucket_ts, key, meter, value, vartype, total, divisor, "
                    "sample_us) VALUES (upper(?), ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (group_guid, bucket_ts, key, meter) DO UPDATE SET " + meters.UPSERT_SET),
    "counter_groups": (5, "INSERT INTO counter_groups (guid, name, description, bucketsize, meters_json) "
                          "VALUES (upper(?), ?, ?, ?, ?) ON CONFLICT (guid) DO UPDATE SET "
                          "name = excluded.name, description = excluded.description, "
                          "bucketsize = excluded.bucketsize, meters_json = excluded.meters_json"),
    "key_info": (4, "INSERT INTO key_info (group_guid, key, label, description) VALUES (upper(?), ?, ?, ?) "
                    "ON CONFLICT (group_guid, key) DO UPDATE SET label = excluded.label, "
                    "description = excluded.description"),
    "alerts": (10, "INSERT INTO alerts (ts_sec, ts_usec, alert_guid, flowkey, sigid, classification, priority, "
                   "message, status, plugin) VALUES (?, ?, upper(?), ?, ?, ?, ?, ?, ?, ?)"),
    "resources": (7, "INSERT INTO resources (ts_sec, ts_usec, resource_guid, flowkey, uri, contents, plugin) "
                     "VALUES (?, ?, upper(?), ?, ?, ?, ?)"),
    "decl_groups": (4, "INSERT INTO decl_groups (kind, guid, name, description) VALUES (?, upper(?), ?, ?) "
                       "ON CONFLICT (kind, guid) DO UPDATE SET name = excluded.name, "
                       "description = excluded.description"),
    "edges": (7, "INSERT INTO edges (ts_sec, s_guid, s_key, t_guid, t_key, flowkey, plugin) "
                 "VALUES (?, upper(?), ?, upper(?), ?, ?, ?)"),
    # a shard's part of a flowtracker bucket (engine/plugins/flowmon.py); _rank_toppers then ranks all parts
    "flow_toppers": (7, "INSERT INTO flow_topper_parts (tracker, bucket_ts, rank, flowkey, metric, shard, count) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (tracker, bucket_ts, shard, rank) DO UPDATE SET "
                        "flowkey = excluded.flowkey, metric = excluded.metric, count = excluded.count"),
    "fts": (6, "INSERT INTO fts (ts_sec, ts_usec, fts_guid, flowkey, text, plugin) VALUES (?, ?, upper(?), ?, ?, ?)"),
    "flows": (len(FLOW_COLUMNS), f"INSERT INTO flows ({_FLOW_COLS}) VALUES ({', '.join('?' * len(FLOW_COLUMNS))})"),
    "run": (2, "INSERT INTO run (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value"),
}
KINDS = tuple(_SQL)
_FLOWS_WITH_ID = f"INSERT INTO flows (id, {_FLOW_COLS}) VALUES ({', '.join('?' * (len(FLOW_COLUMNS) + 1))})"
# Columns a plug-in fills with its own strings: kept as BLOB when not valid UTF-8, so the exact bytes
# come back (docs/schema.md "Text vs binary"); other columns are decoded with \xNN escapes.
_BLOB_OK = {"resources": {4, 5}, "alerts": {4, 5, 7, 8}, "key_info": {1, 2, 3}, "counters": {2}, "edges": {2, 4}}
# JSON text columns: other values are JSON-encoded by the writer (e.g. a meters list given as a list).
_JSON_COL = {"counter_groups": 4, "run": 1}
# Default batch sizes (rows) before a batch is shipped; big-row kinds ship sooner.
_BATCH = {"resources": 256, "fts": 128, "alerts": 1024, "flows": 1024}

# Well-known counter groups (docs/reference.md "Well-known groups"): name resolution when no script declared them.
WELL_KNOWN_GROUPS = {
    "{4CD742B1-C1CA-4708-BE78-0FCA2EB01A86}": "Hosts",
    "{393B5EBC-AB41-4387-8F31-8077DB917336}": "Aggregates",
    "{C51B48D4-7876-479E-B0D9-BD9EFF03CE2E}": "Apps",
    "{4B09BD22-3B99-40FC-8215-94A430EA0A35}": "Mac",
    "{E89BCD56-30AD-40F5-B1C8-8B7683F440BD}": "NetworkLayerStats",
    "{429B65AD-CDA4-452E-A852-24D8A3D0FBB3}": "Subnets",
    "{2314BB8E-2BCC-4B86-8AA2-677E5554C0FE}": "FlowGens",
    "{C0B04CA7-95FA-44EF-8475-3835F3314761}": "FlowIntfs",
    "{D2AAD7C6-E129-4366-A2AD-A8CB9AA4C2F4}": "HTTP Hosts",
    "{C0C9757F-2005-4CC5-BB96-D72F607E6188}": "HTTP Content Types",
    "{6CD742B1-C1CA-4708-BE78-0FCA2EB01A86}": "HostsIPv6",
}
WELL_KNOWN_ALERT_GROUPS = {
    "{9AFD8C08-07EB-47E0-BF05-28B4A7AE8DC9}": "IDS",
    "{5E97C3A3-41DB-4E34-92C3-87C904FAB83E}": "Blacklist",
    "{03AC6B72-FDB7-44C0-9B8C-7A1975C1C5BA}": "Threshold Crossing",
    "{18CE5961-38FF-4AEA-BAF8-2019F3A09063}": "Flow Tracker",
    "{F69C2462-ECEA-45B8-B1CB-F90342D37A4F}": "System",
    "{B5F1DECB-51D5-4395-B71B-6FA730B772D9}": "User Alerts",
}
WELL_KNOWN_RESOURCE_GROUPS = {
    "{D1E27FF0-6D66-4E57-BB91-99F76BB2143E}": "DNS",
    "{4EF9DEB9-4332-4867-A667-6A30C5900E9E}": "URL",
    "{5AEE3F0B-9304-44BE-BBD0-0467052CF468}": "SSL Certs",
    "{9781DB2C-F78A-4F7F-A7E8-2B1A9A7BE71A}": "FileHash",
}
WELL_KNOWN_FTS_GROUPS = {
    "{9FEB8ADE-ADBB-49AD-BC68-C6A02F389C71}": "SSL Certs",
    "{28217924-E7A5-4523-993C-44B52758D5A8}": "HTTP Headers",
    "{09B305DF-078C-4B9E-8E2F-EA64B7326880}": "DNS",
}
WELL_KNOWN_SESSION_GROUPS = {
    "{99A78737-4B41-4387-8F31-8077DB917336}": "IP Flows",
}


WELL_KNOWN_FTS_GROUPS = {
    "{9FEB8ADE-ADBB-49AD-BC68-C6A02F389C71}": "SSL Certs",
    "{28217924-E7A5-4523-993C-44B52758D5A8}": "HTTP Headers",
    "{09B305DF-078C-4B9E-8E2F-EA64B7326880}": "DNS",
}


class StoreError(RuntimeError):
    """The store writer failed (fatal SQLite error, bad rows, crash) or the database is unusable.

    ``report`` holds the writer's final report (rows written per kind, bad rows, errors) when known.
    """

    def __init__(self, message: str, report: dict | None = None):
        super().__init__(message)
        self.report = report or {}


class StoreDied(StoreError):
    """The writer process died or hit a fatal SQLite error (killed, disk full) while the run was going on:
    what it was handed and had not committed, and everything after, can no longer be written.
    ``rows_lost``: rows handed to :class:`StoreWriter` that are not in the database (shipped or still queued,
    minus the writer's last reported commit and its rejected rows); ``pid``: the writer's pid."""

    def __init__(self, message: str, rows_lost: int, pid: int):
        super().__init__(message)
        self.rows_lost = rows_lost
        self.pid = pid


class StoreNotFound(StoreError, FileNotFoundError):
    """No database at the given path."""


def meter_id(meter) -> int | None:
    """A meter given as an id (an int, or a text of ASCII digits with blanks around: ``--meter 3``), else None (a
    meter name).  Before, ``str.isdigit`` took "²" or "٣" for digits and ``int()`` then raised ValueError (a
    traceback from ``luaprobe query counters --meter ²``)."""
    if isinstance(meter, int) and not isinstance(meter, bool):
        return meter
    if isinstance(meter, str) and meter.strip().isascii() and meter.strip().isdigit():
        return int(meter.strip())
    return None


#: a group GUID as ``luaprobe query --group`` takes it (braces optional, any case) (query.GUID)
GUID_TEXT = re.compile(r"^\{?[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}\}?$")


def guid_arg(text: str) -> str:
    """A group GUID given to ``luaprobe query --group`` as stored: upper case, in braces (GUID_TEXT takes it with or
    without them; before, one given without braces matched no row)."""
    t = text.strip()
    return "{" + t.strip("{}").upper() + "}" if GUID_TEXT.match(t) else t.upper()


def name_key(name) -> str:
    """How a group or meter name given to ``luaprobe query`` (``--group`` / ``--meter``) is matched with a stored one:
    blanks around either side ignored, any case.  A script may declare a name with blanks around it (trisul-scripts'
    urlmon.lua names its counter group "URL Service "), and the shell argument "URL Service " or "URL Service" must
    both find it; before, the argument was stripped and the stored name was not, so neither did."""
    return str(name or "").strip().lower()


def db_path(outdir: str) -> str:
    """The database path inside an output directory."""
    return os.path.join(outdir, DB_NAME)


# Columns added after a table first shipped: (table, column, type).  A database written by an earlier version
# (--append, the daemon's continuous record) gets them with ALTER TABLE; its older rows read NULL there.
_ADDED_COLUMNS = (("flows", "setup_rtt_us", "INTEGER"), ("flows", "retrans_az", "INTEGER"),
                  ("flows", "retrans_za", "INTEGER"), ("counters", "vartype", "INTEGER"),
                  ("counters", "total", "NUMERIC"), ("counters", "divisor", "NUMERIC"),
                  ("counters", "sample_us", "INTEGER"))


def _add_columns(db: sqlite3.Connection) -> None:
    for table, col, typ in _ADDED_COLUMNS:
        have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
        if col not in have:
            db.execute(f"ALTER TABLE {table} ADD COLUMN {col} {typ}")


def _flows_table(db: sqlite3.Connection) -> None:
    """Every flow record the engine writes is its own row (``id``, schema version 2): a database of schema 1,
    whose flows had the primary key (flowkey, first_ts) so that a replayed or duplicated flow replaced the
    earlier record, is rebuilt with its rows kept (ids in their old rowid order).  Then the flowkey index."""
    have = [r[1] for r in db.execute("PRAGMA table_info(flows)")]
    if "id" not in have:
        db.execute("DROP INDEX IF EXISTS flows_flowkey")
        db.execute("ALTER TABLE flows RENAME TO flows_v1")
        db.execute(SCHEMA[SCHEMA.index("CREATE TABLE IF NOT EXISTS flows"):
                          SCHEMA.index("CREATE TABLE IF NOT EXISTS decl_groups")].strip().rstrip(";"))
        db.execute(f"INSERT INTO flows ({_FLOW_COLS}) SELECT {_FLOW_COLS} FROM flows_v1 ORDER BY rowid")
        db.execute("DROP TABLE flows_v1")
        db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
    db.execute("CREATE INDEX IF NOT EXISTS flows_flowkey ON flows (flowkey)")


def _wal(db: sqlite3.Connection, wait: float = 30.0) -> str:
    """Switch to WAL; returns the journal mode.  SQLite does not call the busy handler for this switch, so when
    another connection (a shard's writer opening the same new database) holds the lock it is retried here for
    up to ``wait`` seconds, like the busy timeout of every other statement."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


DB_SUFFIXES = ("", "-wal", "-shm")


def create_private(path: str) -> None:
    """Create the database file and its ``-wal`` / ``-shm`` companions, when missing, owner-only (0600) and
    without following a symbolic link at any of their names (``O_NOFOLLOW``): SQLite opens all three with plain
    ``open(O_CREAT)``, which follows a link planted in a shared ``--out`` and makes files 0644 whatever the
    umask.  SQLite keeps files it finds, so the ones made here are the ones it writes.  Raises OSError (ELOOP:
    a link; its message names the file)."""
    for suffix in DB_SUFFIXES:
        name = path + suffix
        try:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise OSError(e.errno, f"{name} is a symbolic link (not followed)") from None
            raise
        os.close(fd)


def open_rw(path: str, max_page_count: int | None = None) -> sqlite3.Connection:
    """Open (creating if needed, owner-only: :func:`create_private`) the database for writing: WAL,
    synchronous=NORMAL, schema applied."""
    create_private(path)
    db = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    try:
        mode = _wal(db)
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot switch to WAL journal mode (got {mode!r})")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("PRAGMA busy_timeout=30000")
        # Schema, migration and version in one write transaction taken up front (BEGIN IMMEDIATE waits on the
        # busy timeout): in autocommit each statement read the schema and then upgraded to a write, and in WAL
        # an upgrade after another writer committed fails at once with "database is locked" without waiting
        # (SQLITE_BUSY_SNAPSHOT) -- the shards of one run open the same database at the same moment.
        db.executescript("BEGIN IMMEDIATE;\n" + SCHEMA)
        _add_columns(db)
        _flows_table(db)
        db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
                   (str(SCHEMA_VERSION),))
        db.execute("COMMIT")
        if max_page_count:
            db.execute(f"PRAGMA max_page_count={int(max_page_count)}")
    except BaseException:
        db.close()
        raise
    return db


# ---------------------------------------------------------------------------------------------- write side
class StoreWriter:
    """Ship rows to a writer process that owns the SQLite connection.

    ``write(kind, rows)`` appends to an in-memory batch (no syscall unless a batch is full or earlier
    bytes are waiting in the backlog); ``flush(sync=False)`` ships every batch, ``flush(sync=True)``
    also waits until the writer has committed them; ``close()`` flushes, waits for the process and
    returns its report, raising :class:`StoreError` if anything went wrong.
    """

    def __init__(self, path: str, *, batch_rows: int = 4096, max_backlog_bytes: int = 64 << 20,
                 max_page_count: int | None = None, python: str = sys.executable,
                 flow_ids: tuple[int, int, int] | None = None, lock_fd: int | None = None):
        """``lock_fd``: the descriptor of the output directory's claim (engine/daemon/usage.py ``OutClaim``), given
        to the writer process (inherited, ``--lock-fd``): a flock belongs to the open file description, so the
        directory stays locked while the writer lives, also after this process died (the writer then commits what
        it was handed and exits at its pipe's EOF); no other run can remove or add to the database meanwhile."""
        self.path = os.path.abspath(path)
        self._batch = {k: min(batch_rows, _BATCH.get(k, batch_rows)) for k in KINDS}
        self._pending: dict[str, list] = {k: [] for k in KINDS}
        self._built: dict[str, bool] = {k: False for k in KINDS}   # the pending rows of a kind are all built rows
        self._max_backlog = max_backlog_bytes
        self._out: collections.deque = collections.deque()
        self._backlog = 0
        self._packer = msgpack.Packer(use_bin_type=True)
        self._unpacker = msgpack.Unpacker(raw=False)
        self._msgs: list = []          # messages read from the writer, not yet consumed
        self._seq = 0
        self._broken: str | None = None  # why the pipe to the writer is unusable
        self._closed = False
        self._report: dict | None = None
        self._shipped = 0              # rows handed to the pipe (rows_lost)
        self._committed = 0            # rows committed + rejected, as the writer last said ("committed")
        self._dead: str | None = None  # why the writer no longer writes (check)
        env = dict(os.environ)
        argv = [python, "-m", "luaprobe.engine.store.writer", "--serve", self.path, "--ppid", str(os.getpid())]
        if max_page_count:
            argv += ["--max-page-count", str(int(max_page_count))]
        if flow_ids is not None:                # a shard's flows ids (_Writer: base, shards, this shard's index)
            argv += ["--flow-ids", ",".join(str(int(x)) for x in flow_ids)]
        if lock_fd is not None:
            argv += ["--lock-fd", str(int(lock_fd))]
        # born with the terminal's signals blocked: a SIGHUP / SIGINT to the process group while the interpreter
        # starts would kill it before serve() ignores them (serve unblocks them once its handlers are set)
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, _STARTUP_SIGNALS)
        try:
            self._proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, bufsize=0, env=env, close_fds=True,
                                          pass_fds=() if lock_fd is None else (int(lock_fd),))
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        self._wfd = self._proc.stdin.fileno()
        self._rfd = self._proc.stdout.fileno()
        os.set_blocking(self._wfd, False)
        try:  # a 1 MiB pipe absorbs bursts without a backlog (Linux; best effort)
            import fcntl
            fcntl.fcntl(self._wfd, 1031, 1 << 20)  # F_SETPIPE_SZ
        except (ImportError, OSError):
            pass

    # -- public API
    @property
    def pid(self) -> int:
        """The writer process id."""
        return self._proc.pid

    def write(self, kind: str, rows, built: bool = False) -> None:
        """Queue rows (a list of tuples in the documented order for ``kind``).  ``built``: the engine made them
        with the documented arity and value types by construction (str, int, float, None; no bytes: e.g.
        engine/fastpath/flowrows.stored), so the writer inserts them without its per-row check and conversion
        (``_Writer.clean``, ~1.5 us per flow row, issue 10).  Rows keep their order across built and other rows
        of the same kind (a batch is shipped whenever the flag changes)."""
        pending = self._pending.get(kind)
        if pending is None:
            raise ValueError(f"unknown store kind {kind!r} (expected one of {', '.join(KINDS)})")
        if self._closed:
            raise StoreError("StoreWriter is closed")
        if pending and self._built[kind] != built:
            self._ship(kind)
            pending = self._pending[kind]
        self._built[kind] = built
        pending.extend(rows)
        if len(pending) >= self._batch[kind]:
            self._ship(kind)
        elif self._out:
            self._pump()

    def flush(self, sync: bool = False, timeout: float = 60.0) -> None:
        """Ship all queued rows; with ``sync`` wait until the writer committed them (raises on failure)."""
        self.ship()
        if sync:
            self._seq += 1
            seq = self._seq
            self._enqueue(self._packer.pack(["s", seq]))
            self._drain(timeout)
            msg = self._wait_msg(lambda m: m[0] == "ack" and m[1] == seq, timeout)
            if msg[2]:
                raise StoreError(f"store writer for {self.path} failed: {msg[2]}")
        else:
            self._drain(timeout)

    def ship(self) -> None:
        """Ship every kind's queued rows now, without waiting for the writer (the pipe takes what it can; the rest
        stays in the backlog, pumped at the next call).  For a run whose input has gone quiet (a paced replay, a
        live interface at a low rate): its rows would otherwise wait for a full batch (write) or the end (flush),
        and the writer commits what it got once it is idle (IDLE_COMMIT_SECS)."""
        for kind in KINDS:
            if self._pending[kind]:
                self._ship(kind)
        if self._out:
            self._pump()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the writer opened the database; raise :class:`StoreError` if it could not."""
        self._wait_msg(lambda m: m[0] == "ready", timeout)

    def check(self) -> str | None:
        """Non-blocking look at the writer (a waitpid and a select; call it a few times a second): None while
        it works, else why it no longer can: ``"store writer (pid 12) was killed by SIGKILL"`` or ``"store
        writer (pid 12) failed: OperationalError: database or disk is full (database ...; N uncommitted rows
        lost)"``.  Once dead, every message it wrote is read, so :meth:`rows_lost` is final."""
        if self._dead is not None or self._report is not None:
            return self._dead
        alive = self._read_msgs(0)
        fatal = next((m for m in self._msgs if m[0] == "fatal"), None)
        rc = self._proc.poll()
        if fatal is None and rc is None and alive and not self._broken:
            return None
        if rc is not None:
            while self._read_msgs(0.2):         # the rest of what it said before it died (EOF ends it)
                pass
            fatal = fatal or next((m for m in self._msgs if m[0] == "fatal"), None)
        if fatal is not None:
            why = f"failed: {fatal[1]}"
        elif rc is not None:
            why = f"was {describe_exit(rc).replace('exit status', 'exited with status')}"
        else:
            why = self._broken or "closed its output"
        self._dead = f"store writer (pid {self._proc.pid}) {why}"
        return self._dead

    def resume(self) -> None:
        """SIGCONT the writer (signal-safe; nothing when it is gone): one stopped with ``kill -STOP`` must run
        to commit what it was handed and exit, not be left behind stopped when the run ends."""
        if self._proc.returncode is None:
            try:
                os.kill(self._proc.pid, signal.SIGCONT)
            except OSError:
                pass

    def rows_lost(self) -> int:
        """Rows handed to :meth:`write` that the writer has not reported committed (or rejected): after a
        death, the rows lost.  A SIGKILL between a COMMIT and its report counts that transaction as lost."""
        return self._shipped + sum(map(len, self._pending.values())) - self._committed

    def close(self, timeout: float = 60.0, check: bool = True) -> dict:
        """Flush, stop the writer and return its report; raise :class:`StoreError` on any failure
        (unless ``check`` is false, in which case the report's ``errors`` list says what went wrong)."""
        if self._report is None:
            self._closed = True
            try:
                if not self._broken:
                    for kind in KINDS:
                        if self._pending[kind]:
                            self._ship(kind)
                    self._enqueue(self._packer.pack(["c"]))
                    self._drain(timeout)
            except StoreError:
                pass
            self._report = self._finish(timeout)
        report = self._report
        if check and report["errors"]:
            raise StoreError(f"store writer for {self.path} failed: " + "; ".join(report["errors"]), report)
        return report

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close(check=exc_type is None)

    def __del__(self):
        # Unclosed writer: closing the pipe makes the writer commit and exit on EOF.
        try:
            if self._report is None and self._proc.stdin and not self._proc.stdin.closed:
                self._proc.stdin.close()
        except Exception:
            pass

    # -- internals
    def _ship(self, kind: str) -> None:
        rows = self._pending[kind]
        self._pending[kind] = []
        self._shipped += len(rows)
        op = "b" if self._built[kind] else "w"
        try:
            data = self._packer.pack([op, kind, rows])
        except (TypeError, ValueError, OverflowError):
            # A value msgpack cannot encode: ship row by row so only the bad rows are lost (and reported).
            good, bad = [], []
            for r in rows:
                try:
                    self._packer.pack(r)
                    good.append(r)
                except (TypeError, ValueError, OverflowError) as e:
                    bad.append(f"{kind}: unencodable row {_short(r)}: {e}")
            data = self._packer.pack([op, kind, good])
            if bad:
                self._enqueue(self._packer.pack(["e", len(bad), bad[:MAX_ERRORS_KEPT]]))
        self._enqueue(data)

    def _enqueue(self, data: bytes) -> None:
        if self._broken:
            return
        self._out.append(memoryview(data))
        self._backlog += len(data)
        self._pump()
        if self._backlog > self._max_backlog:
            self._drain(None, until=self._max_backlog // 2)

    def _pump(self) -> None:
        """Write as much of the backlog as the pipe takes without blocking."""
        out = self._out
        while out:
            try:
                n = os.write(self._wfd, out[0])
            except BlockingIOError:
                return
            except (BrokenPipeError, OSError) as e:
                self._break(f"writer pipe closed ({e.strerror or e})")
                return
            self._backlog -= n
            if n == len(out[0]):
                out.popleft()
            else:
                out[0] = out[0][n:]

    def _drain(self, timeout: float | None, until: int = 0) -> None:
        """Block until the backlog is at most ``until`` bytes; ``timeout`` is the longest the writer may go
        without accepting any data (a slow but working writer, e.g. a million flow rows at the end of a
        run, is waited for; a stuck one is not)."""
        end = None if timeout is None else time.monotonic() + timeout
        while self._out and self._backlog > until:
            before = self._backlog
            self._pump()
            if not self._out or self._backlog <= until:
                break
            if timeout is not None and self._backlog < before:
                end = time.monotonic() + timeout          # progress: the writer is alive
            if self._proc.poll() is not None:
                self._break(f"writer exited ({_exit_how(self._proc.returncode)})")
                break
            left = 0.5 if end is None else min(0.5, end - time.monotonic())
            if left <= 0:
                raise StoreError(f"store writer for {self.path} did not accept data within {timeout} s")
            select.select([], [self._wfd], [], left)

    def _break(self, why: str) -> None:
        self._broken = why
        self._out.clear()
        self._backlog = 0

    def _read_msgs(self, timeout: float) -> bool:
        """Read what the writer said (waiting up to ``timeout``); False on EOF."""
        r, _, _ = select.select([self._rfd], [], [], max(timeout, 0))
        if not r:
            return True
        data = os.read(self._rfd, 65536)
        if not data:
            return False
        self._take(data)
        return True

    def _take(self, data: bytes) -> None:
        """Parse the writer's messages; "committed" ones only update the count (they are not kept)."""
        self._unpacker.feed(data)
        for m in self._unpacker:
            if m[0] == "committed":
                self._committed = m[1]
            else:
                self._msgs.append(m)

    def _wait_msg(self, pred, timeout: float):
        end = time.monotonic() + timeout
        while True:
            for i, m in enumerate(self._msgs):
                if pred(m):
                    return self._msgs.pop(i)
                if m[0] == "fatal":
                    raise StoreError(f"store writer for {self.path} failed: {m[1]}")
            left = end - time.monotonic()
            if left <= 0:
                raise StoreError(f"store writer for {self.path} did not answer within {timeout} s")
            if not self._read_msgs(min(left, 0.5)):
                self._proc.wait(timeout=5)
                raise StoreError(f"store writer for {self.path} exited (code {self._proc.returncode}): "
                                 + _tail(self._proc.stderr.read()))

    def _finish(self, timeout: float) -> dict:
        """Close the pipe, collect the writer's messages and exit status into the final report."""
        proc = self._proc
        try:
            proc.stdin.close()
        except OSError:
            pass
        proc.stdin = None  # communicate() must not touch it again
        errors: list[str] = []
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            errors.append(f"writer did not finish within {timeout} s and was killed")
        except BaseException:          # a hard stop while waiting: the writer (EOF sent) finishes on its own,
            self.resume()              # never left behind stopped (kill -STOP) as an orphan
            raise
        self._take(out or b"")
        report = {"rows": {}, "bad_rows": {}, "errors": errors}
        done = [m for m in self._msgs if m[0] == "done"]
        if done:
            d = done[-1][1]
            report.update({k: v for k, v in d.items() if k != "errors"})
            errors.extend(d.get("errors", []))
        else:
            errors.extend(f"{m[1]}" for m in self._msgs if m[0] == "fatal")
            errors.append(f"writer exited ({_exit_how(proc.returncode)}) without a final report"
                          + (": " + _tail(err) if err else ""))
        if self._broken and not done:
            errors.append(self._broken)
        report["returncode"] = proc.returncode
        if proc.returncode and not errors:
            errors.append(f"writer exited ({_exit_how(proc.returncode)})")
        return report


def _exit_how(rc: int | None) -> str:
    """"signal 9" for a writer a signal ended (Popen.returncode -9), else "code N"."""
    return f"signal {-rc}" if rc is not None and rc < 0 else f"code {rc}"


def _tail(err: bytes, n: int = 800) -> str:
    text = (err or b"").decode("utf-8", "backslashreplace").strip()
    return text[-n:] if text else "(no diagnostics)"


def _short(row, n: int = 160) -> str:
    s = repr(row)
    return s if len(s) <= n else s[:n] + "..."


# ---------------------------------------------------------------------------------------------- writer process
class _Writer:
    """The writer process's state: one connection, one open transaction at a time."""

    def __init__(self, path: str, max_page_count: int | None, flow_ids: tuple[int, int, int] | None = None):
        self.path = path
        self.db = open_rw(path, max_page_count)
        self.flow_ids = None
        if flow_ids is not None:
            self.flow_ids = flow_ids + (self._next_flow_row(*flow_ids),)
        # A page cache that holds the flows index: a million flow rows arrive in random key order at the end of
        # a run, and with SQLite's default 2 MiB cache nearly every insert re-reads an index page (issue 10:
        # the writer's CPU for 1M rows fell by ~30 %, docs/benchmarks.md "End-of-run flow export").  Memory,
        # not a limit: pages are allocated as the database grows.
        self.db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self.in_tx = False
        self.tx_rows = 0
        self.tx_start = 0.0
        self.rows = {k: 0 for k in KINDS}
        self.bad = {k: 0 for k in KINDS}
        self.errors: list[str] = []
        self.fatal: str | None = None
        self.discarded = 0
        self.commits = 0
        self.closed = False
        self.tx_kind: dict[str, int] = {}

    def _next_flow_row(self, base: int, shards: int, index: int) -> int:
        """A shard's writer (``flow_ids``): the number of its next flows row in this run, after the rows an earlier
        process of the same shard wrote (a shard restarted after a crash: shards.py)."""
        top = self.db.execute("SELECT max(id) FROM flows WHERE id > ? AND (id - ? - 1) % ? = ?",
                              (base, base, shards, index)).fetchone()[0]
        return 0 if top is None else (top - base - 1) // shards + 1

    def _flow_ids(self, rows) -> list:
        """Flows rows with their ``id`` first: with --shards N, shard k numbers its j-th row of the run
        base + j * N + k + 1 (base: the largest id before the run, ShardedRun.run), so the shards' writers, which
        write into one table at once, never take the same id and every row's id is the same on every run of the same
        input and options (with one fast path, SQLite numbers the rows in write order, which is that too: docs/schema.md
        ``flows``)."""
        base, shards, index, j = self.flow_ids
        out = [(base + (j + i) * shards + index + 1, *r) for i, r in enumerate(rows)]
        self.flow_ids = (base, shards, index, j + len(rows))
        return out

    def note(self, msg: str) -> None:
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append(msg)
        elif len(self.errors) == MAX_ERRORS_KEPT:
            self.errors.append("(further errors not shown)")

    def apply(self, kind: str, rows: list, built: bool = False) -> None:
        """Insert rows of one kind in a savepoint of the open transaction (one is begun if none is open); a batch
        that fails is retried row by row, bad rows counted and noted.  ``built``: rows of the wire's "b" op, whose
        arity and types hold by construction: not cleaned (clean would return them unchanged) and inserted
        without a savepoint (_insert_built)."""
        if self.fatal:
            self.discarded += len(rows)
            return
        spec = _SQL.get(kind)
        if spec is None:
            self.bad.setdefault(kind, 0)
            self.bad[kind] += len(rows)
            self.note(f"unknown kind {kind!r} ({len(rows)} rows dropped)")
            return
        ncol, sql = spec
        if not built:
            rows = self.clean(kind, ncol, rows)
        if not rows:
            return
        if kind == "flows" and self.flow_ids is not None:
            rows, sql = self._flow_ids(rows), _FLOWS_WITH_ID
        try:
            if not self.in_tx:
                self.db.execute("BEGIN")
                self.in_tx, self.tx_rows, self.tx_start = True, 0, time.monotonic()
            if built:
                n = self._insert_built(kind, sql, rows)
            else:
                self.db.execute("SAVEPOINT batch")
                try:
                    self.db.executemany(sql, rows)
                    self.db.execute("RELEASE batch")
                    n = len(rows)
                except _ROW_ERRORS:
                    self.db.execute("ROLLBACK TO batch")
                    self.db.execute("RELEASE batch")
                    n = self._row_by_row(kind, sql, rows)
            if kind == "flow_toppers":
                self._rank_toppers({(r[0], r[1]) for r in rows})
            self.rows[kind] += n
            self.tx_rows += n
            self.tx_kind[kind] = self.tx_kind.get(kind, 0) + n
        except sqlite3.Error as e:
            self.fail(e)

    def _row_by_row(self, kind: str, sql: str, rows) -> int:
        """One statement at a time (a failing statement rolls back alone): bad rows counted and noted.  Returns the
        rows inserted."""
        n = 0
        for r in rows:
            try:
                self.db.execute(sql, r)
                n += 1
            except _ROW_ERRORS as e:
                self.bad[kind] += 1
                self.note(f"{kind}: bad row {_short(r)}: {e}")
        return n

    def _insert_built(self, kind: str, sql: str, rows) -> int:
        """Built rows (the wire's "b" op) without a savepoint.  A savepoint makes SQLite copy every page the batch
        first modifies into its statement sub-journal (a temporary file): with a million flow rows arriving in
        random flowkey order that was nearly one 4 KiB index page per row, 3.9 GB written and ~2 s of system CPU
        for 1M rows (issue 10, docs/benchmarks.md "End-of-run flow export").  Built rows cannot fail by
        construction; should one fail all the same, each INSERT is its own atomic statement, so the rows before it
        are in (``total_changes`` counts them: every kind's statement changes one row per row, none is DO
        NOTHING) and the rest go row by row, as after a failed savepoint.  Returns the rows inserted."""
        before = self.db.total_changes
        try:
            self.db.executemany(sql, rows)
            return len(rows)
        except _ROW_ERRORS:
            done = self.db.total_changes - before
            return done + self._row_by_row(kind, sql, rows[done:])

    def _rank_toppers(self, buckets) -> None:
        """Rewrite the flow_toppers rows of each (tracker, bucket_ts) in ``buckets`` from every shard's part
        (flow_topper_parts): the top ``count`` by metric, the greater flow key first on a tie (flowmon.py's
        order), ranked 1...  Each flow is ranked in one shard only, so the top ``count`` of the parts' top-``count``
        lists is the top ``count`` of all the bucket's flows, as one fast path ranks them.  Runs in the writer's
        transaction, which holds SQLite's write lock: it sees every part the other shards' writers committed."""
        for tracker, bucket in buckets:
            self.db.execute("DELETE FROM flow_toppers WHERE tracker = ? AND bucket_ts = ?", (tracker, bucket))
            self.db.execute(
                "INSERT INTO flow_toppers (tracker, bucket_ts, rank, flowkey, metric) "
                "SELECT tracker, bucket_ts, row_number() OVER (ORDER BY metric DESC, flowkey DESC), flowkey, metric "
                "FROM flow_topper_parts WHERE tracker = ?1 AND bucket_ts = ?2 ORDER BY metric DESC, flowkey DESC "
                "LIMIT coalesce((SELECT max(count) FROM flow_topper_parts WHERE tracker = ?1 AND bucket_ts = ?2), -1)",
                (tracker, bucket))

    def clean(self, kind: str, ncol: int, rows: list) -> list:
        """Check arity and types; decode bytes (Lua strings) to text.  Bad rows are reported, not written."""
        blob_ok = _BLOB_OK.get(kind, ())
        out = []
        for r in rows:
            if ncol == 9 and kind == "counters" and isinstance(r, (list, tuple)) and len(r) == 5:
                r = (*r, None, None, None, None)       # COUNTER / RUNNING_COUNTER: no merge state (meters.py)
            elif kind == "flow_toppers" and isinstance(r, (list, tuple)) and len(r) == 5:
                r = (*r, 0, None)                      # a whole ranking (one part, shard 0, no count limit)
            if not isinstance(r, (list, tuple)) or len(r) != ncol:
                self.bad[kind] += 1
                want = "5 fields (9 with merge state, engine/store/meters.py)" if kind == "counters" else f"{ncol} fields"
                self.note(f"{kind}: bad row {_short(r)}: expected {want}")
                continue
            if bytes in map(type, r):                  # C-level scan: no generator frame per row
                r = list(r)
                for i, v in enumerate(r):
                    if type(v) is bytes:
                        try:
                            r[i] = v.decode("utf-8")
                        except UnicodeDecodeError:
                            if i not in blob_ok:
                                r[i] = v.decode("utf-8", "backslashreplace")
            if kind in _JSON_COL and not isinstance(r[_JSON_COL[kind]], (str, type(None))):
                r = list(r)
                try:
                    r[_JSON_COL[kind]] = json.dumps(r[_JSON_COL[kind]])
                except (TypeError, ValueError):
                    pass  # left as is: the insert rejects it and the row is reported
            if kind == "counters":
                g, ts, key, meter, value = r[:5]
                if (type(g) is not str or type(key) not in (str, bytes) or type(ts) is not int
                        or type(meter) is not int or type(value) not in (int, float)):
                    try:
                        if type(g) is not str or not isinstance(key, (str, bytes, int)) or isinstance(value, (bool, str)):
                            raise TypeError
                        r = (g, _as_int(ts), key if type(key) is bytes else str(key), _as_int(meter), value + 0,
                             *r[5:])
                    except (TypeError, ValueError):
                        self.bad[kind] += 1
                        self.note(f"counters: bad row {_short(r)}: want (str guid, int bucket_ts, str key, "
                                  f"int meter, number value)")
                        continue
            out.append(r)
        return out

    def commit(self) -> None:
        if self.in_tx and not self.fatal:
            try:
                self.db.execute("COMMIT")
                self.commits += 1
                self.tx_kind.clear()
                # best effort, never blocks: the parent's rows_lost after a death (StoreWriter.check)
                _send(["committed", sum(self.rows.values()) + sum(self.bad.values())], drop_ok=True)
            except sqlite3.Error as e:
                self.fail(e)
        self.in_tx = False

    def fail(self, e: Exception) -> None:
        lost = self.tx_rows if self.in_tx else 0
        self.fatal = f"{type(e).__name__}: {e} (database {self.path}; {lost} uncommitted rows lost)"
        try:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        self.in_tx = False
        for k, n in self.tx_kind.items():  # the rolled-back rows were never written
            self.rows[k] -= n
        self.tx_kind.clear()
        _send(["fatal", self.fatal])

    def report(self) -> dict:
        errors = []
        if self.fatal:
            errors.append(self.fatal + (f"; {self.discarded} later rows discarded" if self.discarded else ""))
        nbad = sum(self.bad.values())
        if nbad:
            errors.append(f"{nbad} bad row(s) rejected: " + "; ".join(self.errors))
        return {"rows": self.rows, "bad_rows": {k: v for k, v in self.bad.items() if v},
                "commits": self.commits, "errors": errors}

    def close(self) -> None:
        if self.closed:
            return
        self.commit()
        self.closed = True
        try:
            if not self.fatal:
                self._optimize()
            self.db.close()
        except sqlite3.Error as e:
            if not self.fatal:
                self.fail(e)

    def _optimize(self) -> None:
        """``PRAGMA optimize`` (ANALYZE of tables this connection queried, e.g. flow_topper_parts) in a write
        transaction taken up front, which waits on the busy timeout.  In autocommit it read, then upgraded to a
        write, and in WAL that upgrade fails at once with 'database is locked' (SQLITE_BUSY_SNAPSHOT: no busy
        handler) when another writer committed in between: the shards of one run closing together, a shard dead
        at the end of its run (3 writers closing at once: 2 of 30 rounds failed, tests/test_store.py)."""
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("PRAGMA optimize")
        self.db.execute("COMMIT")


#: a row's own fault (bad arity, type, constraint): the row is rejected and reported, the batch goes on
_ROW_ERRORS = (sqlite3.IntegrityError, sqlite3.InterfaceError, sqlite3.ProgrammingError, OverflowError, ValueError,
               TypeError)


def _as_int(v) -> int:
    if type(v) is int:
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str):
        return int(v)
    raise TypeError


_parent: int | None = None     # serve(): the parent's pid (an orphan's _send does not wait for pipe room)


def _send(msg, drop_ok: bool = False) -> None:
    """Write a message to the parent (stdout, non-blocking: serve).  ``drop_ok``: skip it when the pipe is full
    (a parent that does not read progress reports must not stall the writer); else wait for room."""
    data = memoryview(msgpack.packb(msg, use_bin_type=True))
    whole = len(data)
    while data:
        try:
            n = os.write(1, data)
        except BlockingIOError:
            if drop_ok and len(data) == whole:
                return          # nothing of it written yet (a pipe write <= PIPE_BUF is all or nothing)
            if _parent is not None and os.getppid() != _parent:
                return          # an orphan whose output pipe another process keeps open: never wait on it
            select.select([], [1], [], 1.0)
            continue
        except OSError:
            return  # the parent is gone; nobody to tell
        data = data[n:]


def _drain_until_eof(fd: int, ppid: int) -> None:
    """After a fatal open error: swallow input until EOF/close so the parent never sees EPIPE mid-run."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=1 << 30)
    while True:
        r, _, _ = select.select([fd], [], [], 1.0)
        if not r:
            if os.getppid() != ppid:
                return
            continue
        data = os.read(fd, 1 << 20)
        if not data:
            return
        unpacker.feed(data)
        for msg in unpacker:
            if msg[0] == "s":
                _send(["ack", msg[1], "database not open"])
            elif msg[0] == "c":
                return


def _held(lock_fd: int | None) -> None:
    """Check that the claim's descriptor ``lock_fd`` came with us (an open directory); raises OSError (EBADF,
    ENOTDIR) naming it otherwise."""
    if lock_fd is None:
        return
    import stat
    try:
        mode = os.fstat(lock_fd).st_mode
    except OSError as e:
        raise OSError(e.errno, f"the output directory's lock (descriptor {lock_fd}) was not inherited: "
                               f"{e.strerror}") from None
    if not stat.S_ISDIR(mode):
        raise OSError(errno.ENOTDIR, f"the output directory's lock (descriptor {lock_fd}) is not a directory")


_STARTUP_SIGNALS = {signal.SIGHUP, signal.SIGINT, signal.SIGTERM}   # blocked from the writer's birth to serve()


def serve(path: str, ppid: int, max_page_count: int | None = None, flow_ids: tuple[int, int, int] | None = None,
          lock_fd: int | None = None) -> int:
    """The writer process: read batches from stdin until close/EOF; report on stdout.  ``lock_fd``: the output
    directory's claim, inherited from the run (``StoreWriter(lock_fd=...)``) and held open until this process
    exits; one that is not an open directory is a fatal open error (nothing is written unclaimed)."""
    # SIGINT, SIGHUP and SIGTERM are the fast path's to handle: it stops gracefully and then closes our pipe ("c").
    # A signal to the whole process group (Ctrl-C, `timeout`, `kill -TERM -PGID`, systemd's KillMode=control-group)
    # reaches us too; before, SIGTERM ended the writer at once and the run lost every row not yet written (exit 1,
    # an empty database).  We still end when the parent dies (EOF, the ppid check) or by SIGKILL.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STARTUP_SIGNALS)     # blocked by StoreWriter until now
    global _parent
    _parent = ppid
    fd = 0
    os.set_blocking(1, False)          # _send: progress reports never block the writer
    try:
        _held(lock_fd)
        w = _Writer(path, max_page_count, flow_ids)
    except (sqlite3.Error, OSError) as e:
        msg = f"cannot open database {path}: {e}"
        parent = os.path.dirname(path) or "."
        if os.path.exists(parent) and not os.path.isdir(parent):
            msg += f" ({parent} is not a directory)"
        elif not os.path.isdir(parent):
            msg += f" (directory {parent} does not exist)"
        elif not os.access(parent, os.W_OK):
            msg += f" (directory {parent} is not writable)"
        _send(["fatal", msg])
        _drain_until_eof(fd, ppid)
        _send(["done", {"rows": {}, "bad_rows": {}, "commits": 0, "errors": [msg]}])
        return 1
    _send(["ready"])
    unpacker = msgpack.Unpacker(raw=False, use_list=False, max_buffer_size=1 << 30)   # rows as tuples: cheaper
    last_ppid_check = time.monotonic()
    try:
        while True:
            wait = IDLE_COMMIT_SECS if w.in_tx else 1.0
            r, _, _ = select.select([fd], [], [], wait)
            now = time.monotonic()
            if not r:
                w.commit()
                if os.getppid() != ppid:
                    return 0  # parent died; the pipe lives on in some other process
                continue
            data = os.read(fd, 1 << 20)
            if not data:
                return 0  # EOF: parent closed the pipe (or died); commit in finally
            unpacker.feed(data)
            for msg in unpacker:
                op = msg[0]
                if op == "w":
                    w.apply(msg[1], msg[2])
                elif op == "b":
                    w.apply(msg[1], msg[2], built=True)
                elif op == "s":
                    w.commit()
                    _send(["ack", msg[1], w.fatal])
                elif op == "e":  # rows the parent could not encode
                    w.bad["unencodable"] = w.bad.get("unencodable", 0) + msg[1]
                    for m in msg[2]:
                        w.note(m)
                elif op == "c":
                    w.close()
                    _send(["done", w.report()])
                    return 0
            if w.in_tx and (w.tx_rows >= COMMIT_ROWS or now - w.tx_start >= COMMIT_SECS):
                w.commit()
            if now - last_ppid_check >= 1.0:
                last_ppid_check = now
                if os.getppid() != ppid:
                    return 0
    finally:
        w.close()


def _main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(prog="python -m luaprobe.engine.store.writer", description="luaprobe store writer process")
    p.add_argument("--serve", metavar="PATH", required=True, help="database to write")
    p.add_argument("--ppid", type=int, default=os.getppid(), help="exit when this parent is gone")
    p.add_argument("--max-page-count", type=int, default=None)
    p.add_argument("--flow-ids", default=None, help="BASE,SHARDS,INDEX: a shard's flows ids (_Writer._flow_ids)")
    p.add_argument("--lock-fd", type=int, default=None, help="the output directory's claim (inherited; held open)")
    a = p.parse_args(argv)
    ids = tuple(int(x) for x in a.flow_ids.split(",")) if a.flow_ids else None
    return serve(a.serve, a.ppid, a.max_page_count, ids, a.lock_fd)


# ---------------------------------------------------------------------------------------------- read side
def _text(v):
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    return v


class Store:
    """Read-only access to a luaprobe database.  Every query returns a list of dicts.

    A BLOB (a script's string that is not UTF-8, docs/schema.md "Text vs binary") is returned as text with
    ``\\xNN`` escapes by default; with ``blobs="bytes"`` as the ``bytes`` it holds, so it cannot be mistaken for
    a TEXT value that happens to contain a backslash (``luaprobe query --json`` reads it that way)."""

    def __init__(self, path: str, blobs: str = "text"):
        if blobs not in ("text", "bytes"):
            raise ValueError(f"blobs must be 'text' or 'bytes', not {blobs!r}")
        self._blob = _text if blobs == "text" else (lambda v: v)
        if os.path.isdir(path):
            path = db_path(path)
        self.path = os.path.abspath(path)
        if not os.path.isfile(self.path):
            raise StoreNotFound(f"no luaprobe database at {self.path}")
        uri = "file:" + urllib.parse.quote(self.path) + "?mode=ro"
        try:
            self.db = sqlite3.connect(uri, uri=True, timeout=30.0)
            self.db.row_factory = sqlite3.Row
            tables = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        except sqlite3.Error as e:
            raise StoreError(f"cannot read database {self.path}: {e}") from None
        missing = {"counters", "counter_groups", "key_info", "alerts", "resources", "flows", "run"} - tables
        if missing:
            self.db.close()
            raise StoreError(f"{self.path} is not a luaprobe database (missing tables: {', '.join(sorted(missing))})")
        self._groups = None

    def close(self) -> None:
        self.db.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _read(self, sql: str, args=()) -> list:
        """Every row of `sql` (sqlite3.Row); StoreError naming the file when SQLite cannot read them (a damaged page:
        "database disk image is malformed", found only when the rows are walked, after the schema was read)."""
        try:
            return self.db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot read database {self.path}: {e}") from None

    def _rows(self, sql: str, args=()) -> list[dict]:
        blob = self._blob
        return [{k: blob(r[k]) for k in r.keys()} for r in self._read(sql, args)]

    # -- counter groups
    def counter_groups(self) -> list[dict]:
        """Declared counter groups with their meters parsed (``meters``: list of dicts)."""
        out = self._rows("SELECT guid, name, description, bucketsize, meters_json FROM counter_groups ORDER BY name")
        for g in out:
            try:
                g["meters"] = json.loads(g["meters_json"] or "[]")
            except ValueError:
                g["meters"] = []
        return out

    def _group_table(self) -> dict:
        if self._groups is None:
            self._groups = {g["guid"]: g for g in self.counter_groups()}
        return self._groups

    def group_name(self, guid: str) -> str | None:
        """The name of a counter group (declared, else well known), or None."""
        g = self._group_table().get((guid or "").upper())
        return (g and g["name"]) or WELL_KNOWN_GROUPS.get((guid or "").upper())

    def resolve_group(self, name_or_guid: str) -> str:
        """A counter group GUID from a name (case-insensitive) or a GUID (any case)."""
        s = name_or_guid.strip()
        for guid, g in self._group_table().items():
            if name_key(g["name"]) == name_key(s):
                return guid
        for guid, name in WELL_KNOWN_GROUPS.items():
            if name_key(name) == name_key(s):
                return guid
        return guid_arg(s)

    def meter_name(self, guid: str, meter: int) -> str | None:
        g = self._group_table().get(guid)
        for m in (g or {}).get("meters", ()):
            if isinstance(m, dict) and m.get("id") == meter:
                return m.get("name")
        return None

    # -- queries
    def counters(self, group: str | None = None, key: str | None = None, meter=None,
                 limit: int | None = None) -> list[dict]:
        """Counter rows: group_guid, group_name, bucket_ts, key, label, meter, meter_name, value.

        ``group`` is a name or GUID; ``key`` matches the key or its label (case-insensitive);
        ``meter`` is a meter id or a meter name."""
        where, args = [], []
        if group is not None:
            where.append("c.group_guid = ?")
            args.append(self.resolve_group(group))
        if key is not None:
            where.append("(c.key = ? OR k.label = ? COLLATE NOCASE)")
            args += [key, key]
        meter_by_name = None
        if meter is not None:
            mid = meter_id(meter)
            if mid is not None:
                # an id SQLite cannot hold matches no row (binding it raised OverflowError: a traceback, exit 1)
                where.append("c.meter = ?" if -2**63 <= mid < 2**63 else "0")
                if -2**63 <= mid < 2**63:
                    args.append(mid)
            else:
                meter_by_name = name_key(meter)
        sql = ("SELECT c.group_guid, c.bucket_ts, c.key, k.label, c.meter, c.value FROM counters c "
               "LEFT JOIN key_info k ON k.group_guid = c.group_guid AND k.key = c.key")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY c.group_guid, c.bucket_ts, c.key, c.meter"
        if limit is not None and meter_by_name is None:
            sql += f" LIMIT {int(limit)}"
        out = []
        for r in self._rows(sql, args):
            r["group_name"] = self.group_name(r["group_guid"])
            r["meter_name"] = self.meter_name(r["group_guid"], r["meter"])
            if meter_by_name is not None and name_key(r["meter_name"]) != meter_by_name:
                continue
            out.append({k: r[k] for k in ("group_guid", "group_name", "bucket_ts", "key", "label", "meter",
                                          "meter_name", "value")})
            if limit is not None and len(out) >= limit:
                break
        return out

    def key_info(self, group: str | None = None, key: str | None = None, limit: int | None = None) -> list[dict]:
        """Key labels: group_guid, group_name, key, label, description."""
        where, args = [], []
        if group is not None:
            where.append("group_guid = ?")
            args.append(self.resolve_group(group))
        if key is not None:
            where.append("(key = ? OR label = ? COLLATE NOCASE)")
            args += [key, key]
        sql = "SELECT group_guid, key, label, description FROM key_info"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY group_guid, key" + (f" LIMIT {int(limit)}" if limit is not None else "")
        out = self._rows(sql, args)
        for r in out:
            r["group_name"] = self.group_name(r["group_guid"])
        return [{k: r[k] for k in ("group_guid", "group_name", "key", "label", "description")} for r in out]

    @staticmethod
    def _guid_arg(guid: str | None, names: dict) -> str | None:
        if guid is None:
            return None
        for g, n in names.items():
            if name_key(n) == name_key(guid):
                return g
        return guid_arg(guid)

    def _timed(self, select: str, guid_col: str, names: dict, guid, flowkey, limit, kind: str) -> list[dict]:
        """Rows of ``select`` ("SELECT ... FROM table") in time order, filtered by group GUID (any case, or a
        well-known name from ``names``, or the name of a group of ``kind`` a script declared: ``decl_groups``) and
        flow key when given: the query behind alerts / resources / fts.  Before, a declared group's name passed
        ``luaprobe query``'s check (query.group_problem lists them) and then matched no row: "(0 rows)"."""
        where, args = [], []
        if guid is not None:
            if not GUID_TEXT.match(guid.strip()):
                declared = {r["guid"].strip().upper(): r["name"] for r in self.decl_groups(kind) if r["name"]}
                names = {**declared, **names}             # a well-known name keeps its built-in group
            where.append(f"{guid_col} = ?")
            args.append(self._guid_arg(guid, names))
        if flowkey is not None:
            where.append("flowkey = ?")
            args.append(flowkey)
        sql = select + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY ts_sec, ts_usec, id" + (f" LIMIT {int(limit)}" if limit is not None else "")
        return self._rows(sql, args)

    def alerts(self, guid: str | None = None, flowkey: str | None = None, limit: int | None = None) -> list[dict]:
        """Alerts in time order (``guid``: alert group GUID, any case, or a well-known group name)."""
        return self._timed("SELECT id, ts_sec, ts_usec, alert_guid, flowkey, sigid, classification, priority, "
                           "message, status, plugin FROM alerts", "alert_guid", WELL_KNOWN_ALERT_GROUPS,
                           guid, flowkey, limit, "alert")

    def resources(self, guid: str | None = None, flowkey: str | None = None, limit: int | None = None) -> list[dict]:
        """Resources in time order (``guid``: resource group GUID, any case, or a well-known group name)."""
        return self._timed("SELECT id, ts_sec, ts_usec, resource_guid, flowkey, uri, contents, plugin FROM resources",
                           "resource_guid", WELL_KNOWN_RESOURCE_GROUPS, guid, flowkey, limit, "resource")

    def fts(self, guid: str | None = None, flowkey: str | None = None, limit: int | None = None) -> list[dict]:
        """Full-text documents in time order (``guid``: FTS group GUID, any case, or a well-known name:
        ``SSL Certs``, ``HTTP Headers``, ``DNS``).  Databases written before the table existed have none."""
        if not self._read("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'fts'"):
            return []
        return self._timed("SELECT id, ts_sec, ts_usec, fts_guid, flowkey, text, plugin FROM fts", "fts_guid",
                           WELL_KNOWN_FTS_GROUPS, guid, flowkey, limit, "fts")

    def flows(self, flowkey: str | None = None, limit: int | None = None) -> list[dict]:
        """Flow records ordered by first_ts, flowkey and id: dicts with ``id`` (the record's row id, unique in the
        database; a flow seen twice, e.g. a capture replayed, is two records) and the ``flows`` columns."""
        have = {r[1] for r in self._read("PRAGMA table_info(flows)")}
        cols = ", ".join(c if c in have else f"NULL AS {c}" for c in FLOW_COLUMNS)   # older databases: _ADDED_COLUMNS
        sql = f"SELECT rowid AS id, {cols} FROM flows"
        args = []
        if flowkey is not None:
            sql += " WHERE flowkey = ?"
            args.append(flowkey)
        sql += " ORDER BY first_ts, flowkey, rowid" + (f" LIMIT {int(limit)}" if limit is not None else "")
        return self._rows(sql, args)

    def decl_groups(self, kind: str | None = None) -> list[dict]:
        """Declared alert / resource / fts groups (alertgroup, resourcegroup scripts) and the built-in ones
        luaprobe knows: {kind, guid, name, description}."""
        sql = "SELECT kind, guid, name, description FROM decl_groups"
        args = []
        if kind is not None:
            sql += " WHERE kind = ?"
            args.append(kind)
        return self._rows(sql + " ORDER BY kind, name", args)

    def edges(self, flowkey: str | None = None, limit: int | None = None) -> list[dict]:
        """Graph edges (add_edge, add_flow_edges) in insertion order."""
        sql = "SELECT ts_sec, s_guid, s_key, t_guid, t_key, flowkey, plugin FROM edges"
        args = []
        if flowkey is not None:
            sql += " WHERE flowkey = ?"
            args.append(flowkey)
        return self._rows(sql + " ORDER BY id" + (f" LIMIT {int(limit)}" if limit is not None else ""), args)

    def flow_toppers(self, tracker: str | None = None, limit: int | None = None) -> list[dict]:
        """flowtracker top-K per bucket: {tracker, bucket_ts, rank (1 = highest), flowkey, metric}."""
        sql = "SELECT tracker, bucket_ts, rank, flowkey, metric FROM flow_toppers"
        args = []
        if tracker is not None:
            sql += " WHERE tracker = ? COLLATE NOCASE"
            args.append(tracker)
        sql += " ORDER BY tracker, bucket_ts, rank" + (f" LIMIT {int(limit)}" if limit is not None else "")
        return self._rows(sql, args)

    def run_info(self) -> dict:
        """Run metadata and final statistics: {key: decoded JSON value} (raw text if not JSON)."""
        out = {}
        for r in self._read("SELECT key, value FROM run ORDER BY key"):
            try:
                out[r[0]] = json.loads(r[1])
            except (TypeError, ValueError):
                out[r[0]] = self._blob(r[1])
        return out


if __name__ == "__main__":
    sys.exit(_main())
