"""Python handle on a shared-memory ring (the protocol itself is shm/ring.lua).

Python code (tests, tools, orchestration) uses this class; the per-record hot
paths run in LuaJIT on both sides and use ring.lua directly.
"""
from __future__ import annotations

import functools

from luaprobe.shm import luajit
from luaprobe.shm import segment

DEFAULT_CAPACITY = 1 << 20


@functools.cache
def _header() -> int:
    return int(luajit.new_runtime().eval('require("luaprobe.shm.ring").HEADER'))


@functools.cache
def _hint_slots(capacity: int) -> int:
    return int(luajit.new_runtime().eval('require("luaprobe.shm.ring").hint_slots')(capacity))


def region_size(capacity: int, hints: bool = False) -> int:
    """Bytes a ring of ``capacity`` data bytes occupies: its header (shm/ring.lua HEADER) plus the data area, plus
    4 bytes per prefetch hint slot when ``hints`` (shm/ring.lua "Prefetch hints": the packet ring)."""
    return _header() + capacity + (4 * _hint_slots(capacity) if hints else 0)


class Ring:
    """One SPSC ring.  Use :meth:`create` (owner) or :meth:`attach` (peer)."""

    def __init__(self, seg: segment.Segment, offset: int = 0, fmt: bool = False, capacity: int = 0,
                 hints: bool = False):
        self.segment = seg
        self.offset = offset
        self._lua = luajit.new_runtime()
        mod = self._lua.eval('require("luaprobe.shm.ring")')
        addr = seg.address + offset
        self._ring = mod.format(addr, capacity, hints) if fmt else mod.attach(addr)
        self.capacity = int(self._ring.cap)
        self.max_record = int(self._ring.max_record)
        g = self._lua.eval
        self._push = g("function(r, s) return r:try_push(s) end")
        self._pop = g("function(r) return r:try_pop() end")
        self._push_batch = g("function(r, t) return r:try_push_batch(t) end")
        self._pop_batch = g("function(r, n) return r:try_pop_batch(n) end")
        self._wait = g("function(r, t) return r:wait_data(t) end")
        self._wait_space = g("function(r, n, t) return r:wait_space(n, t) end")
        self._fill = g("function(r) return r:fill_records(), r:fill_bytes() end")

    @classmethod
    def create(cls, capacity: int = DEFAULT_CAPACITY, purpose: str = "ring", hints: bool = False) -> "Ring":
        """Create a segment holding one formatted ring of ``capacity`` data bytes (with prefetch hints when
        ``hints``: shm/ring.lua)."""
        seg = segment.create(purpose, region_size(capacity, hints))
        try:
            return cls(seg, 0, fmt=True, capacity=capacity, hints=hints)
        except BaseException:
            seg.close()
            raise

    @classmethod
    def attach(cls, name: str, offset: int = 0) -> "Ring":
        """Attach to a ring in an existing segment."""
        return cls(segment.attach(name), offset)

    @property
    def name(self) -> str:
        """Name of the segment holding the ring."""
        return self.segment.name

    def try_push(self, data: bytes) -> bool:
        """Push one record; False when full.  Raises if it can never fit."""
        return bool(self._push(self._ring, bytes(data)))

    def try_pop(self) -> bytes | None:
        """Pop one record, or None when empty."""
        return self._pop(self._ring)

    def try_push_batch(self, records) -> int:
        """Push records in order until the ring is full; returns how many."""
        return int(self._push_batch(self._ring, self._lua.table_from([bytes(r) for r in records])))

    def try_pop_batch(self, max_records: int = 1024) -> list[bytes]:
        """Pop up to ``max_records`` records."""
        t = self._pop_batch(self._ring, max_records)
        return [t[i] for i in range(1, len(t) + 1)]

    def wait_data(self, timeout: float) -> bool:
        """Consumer: block up to ``timeout`` seconds for a record (spins, then sleeps)."""
        return bool(self._wait(self._ring, timeout * 1e9))

    def wait_space(self, nbytes: int, timeout: float) -> bool:
        """Producer: block up to ``timeout`` seconds until ``nbytes`` fit."""
        return bool(self._wait_space(self._ring, nbytes, timeout * 1e9))

    def fill(self) -> tuple[int, int]:
        """(records, bytes) published and not yet consumed."""
        r, b = self._fill(self._ring)
        return int(r), int(b)

    def close(self) -> None:
        """Drop the Lua view and unmap (the owner also unlinks)."""
        self._ring = None
        self._lua = None
        self.segment.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
