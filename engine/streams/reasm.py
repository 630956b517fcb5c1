"""The one TCP reassembly per flow (engine/streams/stage.lua, in the driver VM) and the plug-in VMs it feeds:
every reassembly_handler (docs.trisul.org/docs/lua/reassembly, engine/streams/handler.lua) and every
filex_monitor (docs.trisul.org/docs/lua/fileextract, engine/streams/filex.lua).

Per batch: every handler votes on new flows, the stage reassembles the voted flows and the flows a
filex_monitor still wants (HTTP/1.x ones, decided at their first payload), runs the attribute analysers, and
every handler and filex VM walks the stage's events.  Nothing here runs when neither type is loaded.
"""
from __future__ import annotations

from luaprobe.shm.luajit import method

from .certs import parse_cert

MAX_HANDLERS = 32


class ReassemblyStage:
    """The stage in the driver VM `lua` plus the handler instances that read it."""

    def __init__(self, lua, capacity: int, idle_timeout: float, records, cold, ft=None):
        """`lua`: the driver VM; `records`: its flow table's hot records (``lp_flow *``,
        engine/fastpath/flowtable.lua), whose ``stage_off`` byte the stage sets for flows nobody wants reassembled;
        `cold`: its cold records (``lp_flow_cold *``: the stage reads first_ts there); `ft`: the flow table (its
        ``side_array`` holds the stage's votes, mapped ahead of new flows with the records; None: calloc'd)."""
        self.lua = lua
        self.records, self.cold, self.ft = records, cold, ft
        self._new = lua.eval("function(o) return require('luaprobe.engine.streams.stage').new(o) end")
        self.capacity, self.idle_timeout = capacity, idle_timeout
        self.stage = None
        self.handlers = []          # (vote, events, host)
        self.filex = []             # (events, host)

    def votes_address(self) -> int:
        """The shared vote array (created with the stage on first use)."""
        if self.stage is None:
            self.stage = self._new(self.lua.table_from({b"capacity": self.capacity, b"attributes": False,
                                                        b"parse_cert": parse_cert, b"records": self.records, b"cold": self.cold, b"ft": self.ft,
                                                        b"idle_timeout": self.idle_timeout}))
            self._run = method(self.lua, "run")
            self._finish = method(self.lua, "finish")
            self._tick = method(self.lua, "tick")
            self._events = method(self.lua, "events")
        return int(self.stage.votes_addr)

    def add(self, vm, kind: str = "reassembly_handler") -> str | None:
        """Attach a reassembly_handler VM, or a flowmonitor one (``kind``: its attribute hook only,
        engine/streams/handler.lua); returns a problem text when it cannot be attached."""
        if len(self.handlers) >= MAX_HANDLERS:
            return (f"more than {MAX_HANDLERS} reassembly_handler and flowmonitor plug-ins together: this one does "
                    "not run")
        addr = self.votes_address()
        vm.lua.eval("function(h, a, k, t) return h:setup_reassembly({votes = a, slot = k, table = t}) end")(
            vm.host, addr, len(self.handlers), kind.encode())
        if vm.lua.eval("function(h) return h.rh.want.attribute end")(vm.host):
            self.stage[b"attributes"] = True     # the analysers run only when some handler wants attributes
        self.handlers.append((vm.lua.eval("function(h, a, n) h:rh_vote(a, n) end"),
                              vm.lua.eval("function(h, a, n) return h:rh_events(a, n) end"), vm.host))
        self.stage[b"nhandlers"] = len(self.handlers)
        return None

    def add_filex(self, host, events) -> int:
        """Attach a filex_monitor VM (its host and ``events(host, addr, n)``); returns the vote array's address."""
        addr = self.votes_address()
        self.filex.append((events, host))
        self.stage[b"nfilex"] = len(self.filex)
        return addr

    def remove_filex(self, host) -> None:
        """Detach a filex_monitor whose onload failed."""
        self.filex = [f for f in self.filex if f[1] != host]
        if self.stage is not None:
            self.stage[b"nfilex"] = len(self.filex)

    @property
    def active(self) -> bool:
        """True when some VM reads the stage (else it never runs)."""
        return bool(self.handlers or self.filex)

    def remove(self, vm) -> None:
        """Detach a handler whose onload failed (its vote slot stays used)."""
        self.handlers = [h for h in self.handlers if h[2] != vm.host]
        if self.stage is not None:
            self.stage[b"nhandlers"] = len(self.handlers)

    def batch(self, addr: int, n: int) -> None:
        """Vote, reassemble, deliver the events of one batch."""
        for vote, _, host in self.handlers:
            vote(host, addr, n)
        if self._run(self.stage, addr, n):
            self._deliver()

    def tick(self, sec: int, usec: int) -> None:
        """Packet time reached second `sec`, opened by a packet at `usec` µs: idle flows end (every 10 s), their
        events delivered."""
        if self.stage is not None and self.active and self._tick(self.stage, sec, usec):
            self._deliver()

    def finish(self, sec: int | None = None, usec: int = 0) -> dict:
        """End of input: close every reassembled flow (onterminateflow, the last files), their events at `sec`.`usec`
        (the last tick's time); returns the stage counters."""
        if self.stage is None:
            return {}
        if self._finish(self.stage, sec, usec):
            self._deliver()
        st = self.lua.eval("function(s) return s:stats_table() end")(self.stage)
        stats = {k.decode() if isinstance(k, bytes) else k: v for k, v in st.items()}
        self.lua.eval("function(s) s:free() end")(self.stage)
        self.stage = None
        return stats

    def _deliver(self) -> None:
        addr, nev = self._events(self.stage)
        for _, events, host in self.handlers:
            events(host, addr, nev)
        for events, host in self.filex:
            events(host, addr, nev)
