"""What a user typed, checked before anything starts: one clear line and a documented exit code.

Every mistake on the command line ends the same way: one line on stderr that names the option, the file
(and the line or byte offset when there is one) and what would be accepted, then exit 2 (usage) or 3
(input: a capture file that cannot be read), never a Python traceback and never a half-started run.

* :class:`Parser`: an ``argparse.ArgumentParser`` whose errors are one line (``luaprobe run: --batch: ...
  (luaprobe run --help)``) and that reports a misspelled option first, with the closest spelling, instead of
  argparse's "one of --pcap ... is required".
* ``int_in`` / ``float_in`` / ``power_of_two``: ``type=`` converters that say the accepted range.
* :func:`check_out_dir`, :func:`check_dir_target`, :func:`check_new_file`, :func:`check_dirs`,
  :func:`check_lua_paths`, :func:`check_plugins`, :func:`check_captures`: the file-system checks of a run.
"""
from __future__ import annotations

import argparse
import difflib
import errno
import math
import os
import stat
import sys
import tempfile

from luaprobe.shm.exits import EXIT_INPUT, EXIT_USAGE

#: errno values that are the process's resources running out, not a property of the path being checked
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


class Problem(str):
    """A path problem (the text :func:`dir_problem` / :func:`file_problem` return) with ``resource`` True when its
    cause was the process's own resources (:data:`RESOURCE_ERRNOS`: EMFILE, ENFILE, ENOMEM), not the path: a
    caller then reports an internal condition (exit 1), not a bad setting (exit 2)."""
    resource = False


def _write_problem(e: OSError) -> Problem:
    """``cannot write there: STRERROR`` for a failed write probe, marked ``resource`` for :data:`RESOURCE_ERRNOS`."""
    p = Problem(f"cannot write there: {e.strerror}")
    p.resource = e.errno in RESOURCE_ERRNOS
    return p


#: the output database inside --out
DB_NAME = "luaprobe.sqlite"

#: first four bytes of the capture formats the walker reads (engine/capture/pcapfile.lua: classic pcap usec
#: a1b2c3d4, nsec a1b23c4d and Kuznetzov's "modified" pcap a1b2cd34 (24-byte record headers; libpcap
#: sf-pcap.c KUZNETZOV_TCPDUMP_MAGIC), each in both byte orders; pcapng's Section Header Block 0a0d0d0a)
CAPTURE_MAGICS = {b"\xd4\xc3\xb2\xa1", b"\xa1\xb2\xc3\xd4", b"\x4d\x3c\xb2\xa1", b"\xa1\xb2\x3c\x4d",
                  b"\x34\xcd\xb2\xa1", b"\xa1\xb2\xcd\x34", b"\x0a\x0d\x0d\x0a"}
# compressed captures (Wireshark reads gzip, zstd and lz4 ones itself; libpcap does not): their magic -> packer
COMPRESSED_MAGICS = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4"),
                     (b"\xfd7zX", "xz"), (b"BZh", "bzip2"))
COMPRESSED_TOOLS = {"gzip": "zcat", "zstd": "zstdcat", "lz4": "lz4cat", "xz": "xzcat", "bzip2": "bzcat"}


class OneLineError(ValueError):
    """An error whose ``str()`` is printed as one line: control characters (a newline in a file name given on the
    command line) escaped as ``\\x0a`` by logs.one_line, as the lines printed during a run are.  Before, a path
    holding a newline printed a usage or input line as two, the second one forged."""

    def __str__(self) -> str:
        from luaprobe.shm.logs import one_line
        return one_line(super().__str__())


class UsageError(OneLineError):
    """A bad option or option combination (exit code 2); ``str()`` is the one line shown."""

    exit_code = EXIT_USAGE


class InputProblem(OneLineError):
    """An input file that cannot be used at all (exit code 3); ``str()`` names the file."""

    exit_code = EXIT_INPUT


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors and misspelled options reported first, with a suggestion."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(EXIT_USAGE, f"{self.prog}: {message} ({self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        self._check_spelling(args)
        return super().parse_known_args(args, namespace)

    def _check_spelling(self, args: list) -> None:
        """Reject an option this parser does not know before argparse checks required options."""
        if not self._option_string_actions or self.prefix_chars != "-":
            return
        known = list(self._option_string_actions)
        sub = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        for tok in args:
            if tok == "--":
                return
            if sub is not None and tok in sub.choices:
                return                                  # the sub-command's parser checks the rest
            if not tok.startswith("-") or tok == "-" or _is_number(tok):
                continue
            name = tok.split("=", 1)[0]
            if name in known or (name.startswith("--") and sum(k.startswith(name) for k in known) == 1):
                continue                                # exact, or an unambiguous prefix argparse accepts
            if not name.startswith("--") and len(name) > 2 and name[:2] in known:
                continue                                # -qv, -n5
            close = difflib.get_close_matches(name, [k for k in known if k.startswith("--")], n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            self.error(f"unknown option {name}{hint}")


def _is_number(tok: str) -> bool:
    try:
        float(tok)
        return True
    except ValueError:
        return False


#: the largest [source] speed / `run --speed`: packet-time seconds replayed per second (11.6 days a second)
MAX_SPEED = 1_000_000


def number(v) -> str:
    """A bound or default as a person reads it: ``67108864``, ``0.001``, never ``6.71089e+07``."""
    return str(int(v)) if float(v).is_integer() else f"{v:.10g}"


def int_in(lo: int, hi: int | None = None):
    """``type=`` for an integer in ``lo..hi`` (``hi`` None: no upper bound)."""
    def conv(text: str) -> int:
        try:
            v = int(text, 0)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range: {_range(lo, hi)}")
        return v
    conv.__name__ = "integer"
    return conv


def nonempty(kind: str):
    """``type=`` for a path or a user / group name that may not be empty: ``--stats-json ""`` or ``--user ""`` (a
    shell variable that was not set) was taken for "not given", so the run wrote no summary, or stayed root,
    with exit 0 and no word.  ``kind`` names what to give ("a file name")."""
    def conv(text: str) -> str:
        if text == "":
            raise argparse.ArgumentTypeError(f"empty: give {kind}")
        return text
    conv.__name__ = "text"
    return conv


def float_in(lo: float, hi: float | None = None, lo_open: bool = False):
    """``type=`` for a number >= lo (> lo when ``lo_open``) and <= hi."""
    def conv(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < lo or (lo_open and v == lo) or (hi is not None and v > hi):
            rng = f"> {number(lo)}" if lo_open else f">= {number(lo)}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: must be {rng}"
                                             + (f" and <= {number(hi)}" if hi is not None else ""))
        return v
    conv.__name__ = "number"
    return conv


def power_of_two(lo: int, hi: int):
    """``type=`` for a power of two in ``lo..hi`` (bytes)."""
    def conv(text: str) -> int:
        v = int_in(lo, hi)(text)
        if v & (v - 1):
            raise argparse.ArgumentTypeError(f"{v} is not a power of two ({lo}..{hi})")
        return v
    conv.__name__ = "power of two"
    return conv


def cpu_pins(text: str) -> str:
    """``type=`` for --pin-cpus: "auto", "off" or "C,F" (shm/cpus.py), returned as given (lower case)."""
    from luaprobe.shm import cpus
    try:
        cpus.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text.strip().lower()


cpu_pins.__name__ = "CPU pinning"


def huge_pages(text: str) -> str:
    """``type=`` for --huge-pages: "auto", "on" or "off" (engine/fastpath/hugepages.py), lower case."""
    from luaprobe.engine.fastpath import hugepages
    try:
        return hugepages.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


huge_pages.__name__ = "huge pages setting"


def _range(lo, hi) -> str:
    return f"must be >= {lo}" if hi is None else f"must be between {lo} and {hi}"


class OutClaim:
    """An ``--out`` directory held by one run (or one daemon) for its whole life: an exclusive ``flock`` on the
    directory itself, so two runs into one ``--out`` can never both decide that it is theirs (the second is
    refused, exit 2).  The lock belongs to the open file description: the kernel drops it when the last descriptor
    of it is closed, however the processes holding it end, so a crashed run never leaves a stale claim.  The run's
    processes that write into the directory inherit ``fd`` (RunConfig.out_lock_fd: the store writers, shard
    processes, the daemon's fast path), so it stays locked until the last of them has exited, not only until this
    process has.  ``release()`` closes this process's descriptor (never ``LOCK_UN``, which would unlock it for those
    processes too), and removes the directory when the claim made it and it is still empty (a run refused later,
    before it wrote anything, leaves nothing behind)."""

    def __init__(self, path: str, fd: int, made: bool):
        self.path, self.fd, self.made = path, fd, made

    def release(self) -> None:
        if self.fd is None:
            return
        if self.made:                                # removed while still locked: a run that opened it meanwhile
            try:                                     # finds it gone once it holds the lock (claim_out_dir retries)
                os.rmdir(self.path)
            except OSError:
                pass                                 # not empty: the run wrote there
        os.close(self.fd)
        self.fd = None


def claim_out_dir(out: str, what: str = "--out", private: bool = False, shared: bool = False) -> OutClaim:
    """Create ``out`` (one level; mode 0700 whatever the umask: it holds traffic data; ``private`` is kept for callers)
    when missing and lock it (``flock(LOCK_EX | LOCK_NB)`` on the directory; ``shared``: LOCK_SH, a look that two
    `start` commands may take at once, refused only by a holder).
    Raises :class:`UsageError` ``WHAT OUT: another luaprobe run or daemon is writing into it ...`` when it is held."""
    for _ in range(8):                               # the holder may remove the directory as we lock it
        claim = _try_claim(out, what, private, shared)
        if claim is not None:
            return claim
    raise UsageError(f"{what} {out}: cannot write there: it keeps being removed and made again by another run")


def _try_claim(out: str, what: str, private: bool, shared: bool) -> OutClaim | None:
    """One attempt of :func:`claim_out_dir`; None when the directory locked is no longer the one at ``out``.  A
    filesystem without flock (ENOLCK, EOPNOTSUPP, EBADF, EINVAL: NFS without a lock daemon, some FUSE ones) is
    written unlocked, with one warning line on stderr, as before locks were taken."""
    import fcntl
    made = False
    try:
        if not os.path.isdir(out):
            try:
                os.mkdir(out, 0o700)              # owner-only whatever the umask: traffic data
                made = True
            except FileExistsError:
                pass                                 # made by another run at the same moment: the lock decides
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        raise UsageError(f"{what} {out}: cannot write there: {e.strerror}") from None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"{what} {out}: another luaprobe run or daemon is writing into it now (it is "
                         "locked); wait for it to finish, or write elsewhere") from None
    except OSError as e:
        print(f"luaprobe: {what} {out}: not locked ({e.strerror}: the filesystem takes no flock); two runs "
              "into it at once are not kept apart", file=sys.stderr)
    try:
        here = os.stat(out)
    except OSError:
        here = None
    st = os.fstat(fd)
    if here is None or (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)                                 # removed (and perhaps made again) before we held it
        return None
    return OutClaim(out, fd, made)


def db_link(out: str) -> str | None:
    """The first of the database's names in ``out`` (``luaprobe.sqlite`` and its ``-wal`` / ``-shm`` / ``-journal``)
    that is a symbolic link, or None: such a link, planted in a shared output directory, is never followed."""
    db = os.path.join(out, DB_NAME)
    for suffix in ("", "-wal", "-shm", "-journal"):
        if os.path.islink(db + suffix):
            return db + suffix
    return None


def check_out_dir(out: str, mode: str, private: bool = False) -> OutClaim:
    """``--out DIR`` before a run: DIR may not be a file, it is claimed (:func:`claim_out_dir`: created, locked for the
    run), and under that lock an earlier run's database there is refused (``mode`` "new"), left for
    :func:`replace_earlier_run` to remove once every other check passed ("overwrite") or added to ("append").
    Returns the claim, which the caller holds until the run has ended.  Raises :class:`UsageError` (nothing
    claimed)."""
    check_dir_target("--out", out, "(--out names the output directory)", write=True)
    claim = claim_out_dir(out, private=private)
    try:
        db = os.path.join(out, DB_NAME)
        link = db_link(out) if mode != "overwrite" else None
        if link:
            raise UsageError(f"--out {out}: {link} is a symbolic link (not followed); remove it, or "
                             "use --overwrite to replace it, or another --out")
        if mode == "append" and os.path.exists(db):
            problem = not_a_database(db)
            if problem:
                raise UsageError(f"--out {out}: cannot --append to {db}: {problem}; use --overwrite to replace it, "
                                 "or another --out")
        if mode == "new" and os.path.exists(db):
            raise UsageError(f"--out {out}: already holds the results of an earlier run ({db}); use --overwrite to "
                             "replace them, --append to add this run to them, or another --out")
    except UsageError:
        claim.release()
        raise
    return claim


def replace_earlier_run(out: str) -> None:
    """``--overwrite``: remove an earlier run's database from the claimed ``--out`` (its four names; a symbolic link
    there is removed, not followed).  Called once every check of the run has passed, just before it starts, so that
    a run refused for any reason (a usage error, a plug-in directory with no plug-in) leaves the earlier results
    where they were.  Raises :class:`UsageError` naming the file when one cannot be removed."""
    db = os.path.join(out, DB_NAME)
    for suffix in ("", "-wal", "-shm", "-journal"):
        try:
            os.unlink(db + suffix)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise UsageError(f"--out {out}: cannot remove {db + suffix}: {e.strerror}") from None


#: tables every luaprobe database has had (engine/store/writer.py Store checks the same set before a query)
CORE_TABLES = frozenset({"counters", "counter_groups", "key_info", "alerts", "resources", "flows", "run"})


def not_a_database(db: str) -> str | None:
    """Why ``db`` cannot be opened as an SQLite database (``file is not a database``, read-only, nothing written) or
    is another program's (it has tables, but not luaprobe's: before, the run started and its store writer failed on
    the first mismatched table, "no such column: alert_guid", exit 1 with the run's rows lost), or None (an empty
    database, with no table at all, is appended to: its tables are made).  Checked before an --append starts, so
    that the store writer does not find it after the run began."""
    import pathlib
    import sqlite3
    try:
        con = sqlite3.connect(pathlib.Path(os.path.abspath(db)).as_uri() + "?mode=ro", uri=True)
        try:
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.Error as e:
        return f"{e} (SQLite)"
    missing = CORE_TABLES - tables
    if tables and missing:
        return f"not a luaprobe database (missing tables: {', '.join(sorted(missing))})"
    return None


def dangling_link(path: str) -> str | None:
    """"is a symbolic link to T, which does not exist" when ``path`` is a link whose target is missing (else
    None): the true reason, where creating ``path`` would fail with "File exists"."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"is a symbolic link to {os.readlink(path)}, which does not exist (create it, or give another path)"
    return None


NOT_A_DIRECTORY = "exists and is not a directory"


def check_private_dir(what: str, path: str, user: str | None = None) -> None:
    """``--filex-dir`` / ``[filex] dir``: extracted files get predictable names built from the traffic
    (engine/streams/filex.lua ``<host><uri>-<instance>-<stream>-<n>``) and are opened by plain ``io.open``, so in
    a directory other users can write, a symbolic link planted at such a name would have the run (root) write the
    packet's bytes wherever it points.  Raises :class:`UsageError` for an existing directory writable by group or
    others (sticky or not), or owned by a user other than root, this user and ``user`` (the ``--user`` /
    ``[run] user`` the run drops to): its owner can plant links too.  A missing one is made 0700 by the run."""
    try:
        st = os.stat(path)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        return
    if st.st_mode & 0o022:
        raise UsageError(f"{what} {path}: writable by other users (mode {stat.S_IMODE(st.st_mode):o}): a symbolic "
                         "link planted at an extracted file's name (they are predictable) would redirect the "
                         "traffic's bytes; give a directory only its owner can write (chmod go-w)")
    if st.st_uid not in _trusted_uids(user):
        raise UsageError(f"{what} {path}: owned by another user (uid {st.st_uid}): its owner could plant a symbolic "
                         "link at an extracted file's name (they are predictable) and redirect the traffic's bytes; "
                         "give a directory owned by this user, root or the --user the run drops to")


def _trusted_uids(user: str | None) -> set:
    """root, the effective user and the user a run drops to (when it resolves; an unknown one is reported by
    its own check)."""
    uids = {0, os.geteuid()}
    if user:
        from .privileges import resolve
        try:
            uids.add(resolve(user).uid)
        except UsageError:
            pass
    return uids


def dir_problem(path: str, creating=(), write: bool = False) -> str | None:
    """Why ``path`` cannot be a directory the run creates when missing (``--out``, ``--filex-dir``, the daemon's
    run directory), or None: not a dangling link, not a file, its parent existing or one of ``creating`` (made by
    the run first: ``--filex-dir out/files`` in a new ``--out``; the run creates one level, never a whole missing
    path).  With ``write`` (the run writes there) writing is tried for real, unless the parent is one of
    ``creating``: the directory made (and removed) when missing, a temporary file with a 4 KiB block written in it,
    since permission bits say nothing for root, a read-only mount or /proc, and an empty file fits on a full
    filesystem (the run then started and its store writer failed: exit 1 instead of 2)."""
    path = os.path.abspath(path)
    if dangling_link(path):
        return dangling_link(path)
    try:                                             # one stat: a racing command's probe may remove it meanwhile
        is_dir = stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        is_dir = None                                # missing
    if is_dir is False:
        return NOT_A_DIRECTORY
    parent = os.path.dirname(path)
    if not os.path.isdir(path) and not os.path.isdir(parent):
        return None if _created(parent, creating) else f"the parent directory {parent} does not exist"
    if not write:
        return None
    steady = 0
    for _ in range(64):            # commands at once (racing `luaprobe start`s): each may make and remove it
        problem = _try_write(path)
        if getattr(problem, "steady", False):
            steady += 1            # no file made in a directory that stayed: a race only if it is the same inode
            continue               # made again at once, so only 64 of 64 say it is the directory (/proc/1)
        if problem != "":
            return problem
    if steady == 64:
        return problem
    return "cannot write there: it keeps being made and removed by another command"


def _dir_id(path: str):
    """(st_dev, st_ino) of the directory ``path``, or None when it is not one now."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _try_write(path: str) -> str | None:
    """One write probe of :func:`dir_problem`: None (writable), its problem, or "" when another command made or
    removed the directory (its own probe) between our steps: look again.  A file that cannot be made (ENOENT) in
    a directory that was there before and after with the same identity comes back as a problem marked
    ``steady``: the file system takes no new file there (/proc/1), or another command removed it and made it
    again on the same inode; dir_problem believes the first when all its tries say so (before, 64 tries ended in
    "it keeps being made and removed by another command" for /proc/1)."""
    made = False
    try:
        if not os.path.isdir(path):
            try:
                os.mkdir(path, 0o700)
                made = True
            except FileExistsError:
                pass                                 # made by another command this moment
    except OSError as e:
        return _write_problem(e)
    before = _dir_id(path)
    try:
        with tempfile.TemporaryFile(dir=path) as f:
            f.write(bytes(4096))
            f.flush()
    except FileNotFoundError as e:
        if made:
            return _write_problem(e)
        if before is None or _dir_id(path) != before:
            # removed by another command's probe as we wrote (a third may have made it again since): look again
            return ""
        p = Problem(f"cannot write there: its file system makes no new file in it (creating one: {e.strerror}; "
                    "/proc and /sys are such)")
        p.steady = True
        return p
    except OSError as e:
        return _write_problem(e)
    finally:
        if made:
            try:
                os.rmdir(path)
            except OSError:
                pass
    return None


def writable_dir(path: str) -> str | None:
    """Why the daemon could not use ``path`` as a directory it writes into, or None (:func:`dir_problem`)."""
    return dir_problem(path, write=True)


def _created(parent: str, creating) -> bool:
    """``parent`` (absolute) is one of the directories ``creating`` that the run itself creates (``--out``)."""
    return any(parent == os.path.abspath(d) for d in creating if d)


def check_dir_target(option: str, path: str, hint: str = "", creating=(), write: bool = False) -> None:
    """:func:`dir_problem` as a :class:`UsageError` ``OPTION PATH: problem`` (``hint`` after "exists and is not a
    directory")."""
    problem = dir_problem(path, creating, write)
    if problem:
        raise UsageError(f"{option} {path}: {problem}" + (f" {hint}" if hint and problem == NOT_A_DIRECTORY else ""))


def file_problem(path: str, creating=(), append: bool = False, rename: bool = False) -> str | None:
    """Why the command could not write the file ``path``, or None: not a directory, its directory existing or one of
    ``creating`` (the ``--out`` or run directory the run creates first).  Writing is tried for real: a temporary
    file beside it with a 4 KiB block (the file is replaced by a rename, :func:`write_file_atomic`, or rotated by
    renaming), so a read-only or full filesystem, or /proc, is found before the run, not after it.  ``append`` (a
    file appended to and rotated: [stats] json_lines_file): a FIFO or device there is refused (opening it would block
    until a reader comes, and only a regular file can be renamed) and an existing file must open for appending.
    ``rename`` (a file written by :func:`write_file_atomic`: --stats-json): a FIFO, device or socket there is refused
    (the rename would replace it with a regular file: /dev/null gone).  ``gen --out`` writes into the path itself,
    so ``gen --out /dev/null`` stays allowed."""
    if os.path.isdir(path):
        return "is a directory (give a file name)"
    if append and os.path.exists(path) and not os.path.isfile(path):
        return "is not a regular file (a FIFO or device cannot be rotated; give a file name)"
    special = _special_file(path) if rename else None
    if special:
        return f"is not a regular file ({special}: the rename that writes the file would replace it; give a file name)"
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return None if _created(parent, creating) else f"the directory {parent} does not exist"
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix="." + os.path.basename(path) + ".") as f:
            f.write(bytes(4096))
            f.flush()
        if append and os.path.exists(path):
            with open(path, "ab"):
                pass
    except OSError as e:
        return _write_problem(e)
    return None


def _special_file(path: str) -> str | None:
    """What ``path`` is when it exists and is neither a regular file, a directory nor a symbolic link ("a FIFO",
    "a character device", "a block device", "a socket"), else None.  Such a file is never written by a rename:
    ``os.replace`` would put a regular file in its place (``--stats-json /dev/null`` as root removed the device)."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    for test, what in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return None


RUN_DIR_FILES = ("supervisor.pid", "control.sock", "state.json", "stats.json", "supervisor.log", "heartbeat",
                 "active_config.json", "last_error.json", "last_summary.json", "loaded.json")
#: the daemon's own files in its run directory (engine/daemon/control.py, supervisor.py HEARTBEAT)


def own_file_problem(path: str, out: str, inputs=(), plugins=(), run_dir: str | None = None) -> str | None:
    """Why ``path`` (a file written by a rename at the end, ``--stats-json``, or appended to and rotated, ``[stats]
    json_lines_file``) cannot be used because the run itself reads or writes it, or None: the ``out`` directory, its
    database (``luaprobe.sqlite`` and its -wal, -shm, -journal) or packet store (``packets*.pcapng``), a ``--pcap``
    input, a PLUGIN file, or one of the daemon's files in ``run_dir``.  Before, ``--stats-json out/luaprobe.sqlite``
    exited 0 with the database replaced by the summary (the run's rows gone; with --append every earlier run's too),
    ``json_lines_file`` pointed at it appended JSON to the live database (and its rotation would rename it away), and
    ``--stats-json out`` ran the whole input and then failed (exit 1, "Is a directory")."""
    real = os.path.realpath(path)
    out_real = os.path.realpath(out)
    if real == out_real:
        return "is the --out directory (give a file name)"
    name, parent = os.path.basename(real), os.path.dirname(real)
    if parent == out_real and (name in [DB_NAME + s for s in ("", "-wal", "-shm", "-journal")] or
                               (name.startswith("packets") and name.endswith(".pcapng"))):
        return f"is a file the run writes in --out {out} (writing there would destroy it; give another name)"
    if run_dir and parent == os.path.realpath(run_dir) and name in RUN_DIR_FILES:
        return f"is the daemon's own {name} in its run directory {run_dir} (give another name)"
    for what, paths in (("a --pcap input", inputs), ("a plug-in file", plugins)):
        for p in paths:
            if p != "-" and os.path.realpath(p) == real:
                return f"is {what} (writing there would destroy it; give another name)"
    return None


def check_not_an_input_or_output(option: str, path: str, out: str, inputs=(), plugins=()) -> None:
    """:func:`own_file_problem` as a :class:`UsageError` ``OPTION PATH: problem`` (``--stats-json``)."""
    problem = own_file_problem(path, out, inputs, plugins)
    if problem:
        raise UsageError(f"{option} {path}: {problem}")


def check_new_file(option: str, path: str, creating=(), rename: bool = False) -> None:
    """A file the command will write (``--stats-json`` with ``rename``, ``gen --out``): :func:`file_problem` as a
    :class:`UsageError` ``OPTION PATH: problem``; an empty ``path`` (a shell variable not set) is
    ``OPTION: empty: give a file name`` (before, ``gen --out ""`` passed and ended in a traceback)."""
    if not path:
        raise UsageError(f"{option}: empty: give a file name")
    problem = file_problem(path, creating, rename=rename)
    if problem:
        raise UsageError(f"{option} {path}: {problem}")


def write_file_atomic(path: str, data: bytes) -> None:
    """Write ``path`` whole or not at all: a temporary file in its directory, then ``os.replace``.  On an error
    (OSError: a full disk) the temporary file is removed and the error raised; ``path`` keeps what it held."""
    special = _special_file(path)
    if special:                                   # made there during the run: never replaced by the rename
        raise OSError(errno.EEXIST, f"is not a regular file ({special}), not replaced", path)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix="." + os.path.basename(path) + ".")
    try:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)      # a file replaced keeps its mode
        except FileNotFoundError:
            mask = os.umask(0)
            os.umask(mask)
            mode = 0o666 & ~mask                            # a new one gets open()'s
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def check_dirs(option: str, paths: list) -> None:
    """Every path given to a directory option (``--lua-path``) is an existing directory; a typo would otherwise
    surface later as a `require` that fails inside a plug-in.  Raises :class:`UsageError` naming the first."""
    for p in paths:
        if not os.path.isdir(p):
            raise UsageError(f"{option} {p}: " + ("not a directory" if os.path.exists(p) else "no such directory"))


def check_lua_paths(lua_path: list) -> None:
    """The Lua search directories of a run or check: every ``--lua-path`` and every ``TRISUL_LUA_PATHS`` entry
    (shm/searchpath.py ``env_dirs``) is an existing directory, one rule and one message for both
    (``TRISUL_LUA_PATHS /x: no such directory``).  Raises :class:`UsageError` naming the first bad one."""
    from luaprobe.shm.searchpath import env_dirs
    check_dirs("--lua-path", lua_path)
    check_dirs("TRISUL_LUA_PATHS", env_dirs())


def check_plugins(paths: list) -> None:
    """Every PLUGIN argument exists and can be read: a file is opened, a directory listed.  A typo here is the
    user's (exit 2, nothing started), not a plug-in that failed to load (exit 4).  Raises :class:`UsageError`
    naming the first bad path: ``/x.lua: no such plug-in file or directory``."""
    for p in paths:
        try:
            if os.path.isdir(p):
                os.listdir(p)
            elif not os.path.exists(p):
                raise UsageError(f"{p}: no such plug-in file or directory")
            elif not stat.S_ISREG(os.stat(p).st_mode):
                raise UsageError(f"{p}: not a regular file or a directory (give a plug-in .lua file or a directory)")
            else:
                with open(p, "rb"):
                    pass
        except OSError as e:
            raise UsageError(f"{p}: cannot read the plug-in: {e.strerror}") from None


def check_captures(paths: list) -> None:
    """Every ``--pcap`` exists, is a readable regular file and starts with a pcap or pcapng magic; ``-`` (stdin,
    at most once) and FIFOs are streams, checked by the capture process as they are read.
    Damage further in is found by the walker during the run (reported with its byte offset).
    Raises :class:`InputProblem` naming the first bad file."""
    if paths.count("-") > 1:
        raise UsageError("--pcap -: standard input can be read only once")
    for p in paths:
        if p == "-":                                                       # stdin: read as a stream
            continue
        try:
            mode = os.stat(p).st_mode
            if stat.S_ISFIFO(mode):                                        # read as a stream; peeking would
                continue                                                   # take its first bytes
            if not stat.S_ISREG(mode) and not os.path.isdir(p):
                raise InputProblem(f"--pcap {p}: not a regular file (nor a FIFO or -)")
            with open(p, "rb") as f:
                head = f.read(4)
        except FileNotFoundError:
            raise InputProblem(f"--pcap {p}: no such file") from None
        except IsADirectoryError:
            raise InputProblem(f"--pcap {p}: is a directory, not a capture file") from None
        except PermissionError:
            raise InputProblem(f"--pcap {p}: permission denied") from None
        except OSError as e:
            raise InputProblem(f"--pcap {p}: cannot read: {e.strerror}") from None
        if not head:
            raise InputProblem(f"--pcap {p}: empty file (no capture header)")
        if head not in CAPTURE_MAGICS:
            packer = next((name for magic, name in COMPRESSED_MAGICS if head.startswith(magic)), None)
            hint = (f"; it is {packer}-compressed: decompress it first, or stream it: "
                    f"{COMPRESSED_TOOLS[packer]} {p} | luaprobe run ... --pcap -") if packer else ""
            raise InputProblem(f"--pcap {p}: byte offset 0: not a pcap or pcapng file "
                               f"(file magic 0x{head.hex()}){hint}")
