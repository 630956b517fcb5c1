"""T.re2 (Google RE2 through engine/plugins/_lpre2.cc) and T.ac (ahocorasick-rs) against independent models:
Python's `re` for the patterns both engines read alike, and a naive str.find model for Aho-Corasick
(issue 14.4; docs.trisul.org/docs/lua/obj_re2, obj_ac)."""
from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from luaprobe.shm.luajit import new_runtime

_VM = None


def vm():
    global _VM
    if _VM is None:
        lua = new_runtime()
        lua.execute(b'T = require("luaprobe.engine.plugins.tlib").install({})')
        _VM = lua
    return _VM


def ev(expr: str):
    return vm().eval(expr.encode())


CASES = [
    (r"(\w+)@(\w+)\.com", ["me@host.com", "x me@.com", "a_b@c1.com!"]),
    (r"(?i)user-agent:\s*(\S+)", ["User-Agent: curl/8", "USER-AGENT:x", "agent: y"]),
    (r"^(GET|POST) (/\S*)", ["GET /a HTTP/1.1", "POST / ", " GET /"]),
    (r"(a)|(b)", ["b", "a", "c"]),
    (r"\.exe$|\.dll$", ["a.exe", "b.DLL", "d.exe.txt"]),
]


@pytest.mark.parametrize("pattern,subjects", CASES)
def test_re2_methods_against_python_re(pattern, subjects):
    new = ev("function(p) return T.re2(p) end")
    call = ev("function(r, m, s) return {r[m](r, s)} end")
    r = new(pattern.encode())
    py = re.compile(pattern.encode())
    for s in subjects:
        sb = s.encode()
        want, full = py.search(sb), py.fullmatch(sb)
        assert call(r, b"partial_match", sb)[1] is (want is not None)
        assert call(r, b"full_match", sb)[1] is (full is not None)
        got = call(r, b"partial_match_n", sb)
        if want is None:
            assert got[1] is False and len(got) == 1          # false plus nils
        else:
            assert got[1] is True
            # a group that did not take part gives "" (RE2's C++ API, which Trisul wraps)
            assert [got[k] for k in range(2, py.groups + 2)] == [g or b"" for g in want.groups(b"")]
        got1 = call(r, b"partial_match_c1", sb)
        c1 = (want.group(1) or b"") if want is not None and py.groups else b""
        assert got1[1] is (want is not None) and (want is None or got1[2] == c1)


def test_re2_options():
    m = ev("function(p, o, s) return T.re2(p, o):partial_match(s) end")
    t = vm().table_from
    assert m(b"ABC", t({b"case_sensitive": False}), b"xabcx") is True
    assert m(b"ABC", None, b"xabcx") is False
    assert m(b"a.c", t({b"literal": True}), b"abc") is False and m(b"a.c", t({b"literal": True}), b"a.c") is True
    c = ev("function(p, o, s) return select(2, T.re2(p, o):partial_match_c1(s)) end")
    assert c(b"(a+?)", None, b"aaa") == b"a" and c(b"(a+?)", t({b"longest_match": True}), b"aaa") == b"aaa"
    ok, err = ev("function() return pcall(T.re2, 'a', {no_such = true}) end")()
    assert ok is False and b"unknown option 'no_such'" in err


def test_re2_linear_time_on_a_pattern_that_backtracks_exponentially():
    """`(a|aa)*c` against 64 a's: a backtracking matcher (luaprobe's old one) never finishes (2^64 paths; the
    suite's timeout fails it); RE2 answers at once.  match_value runs on header values from the wire."""
    f = ev("""function(s)
        local h = require("luaprobe.engine.plugins.httpheader").new{ is_request = true, method = "GET", path = "/",
                                                                   headers = { {"X-Evil", s} } }
        return h:match_value("X-Evil", "(a|aa)*c"), T.re2("(a|aa)*c"):partial_match(s)
      end""")
    assert f(b"a" * 64) == (False, False)
    assert f(b"a" * 64 + b"c") == (True, True)


SCRIPT = b"""local hh = require("luaprobe.engine.plugins.httpheader")
local h = hh.new{ is_request = true, method = "GET", path = "/", headers = { {"Host", "a.com"} } }
local ok = h:match_value("Host", "a.com")
local bad = h:match_value("Host", "(unclosed")
return ok, bad
"""


@pytest.mark.parametrize("script", [SCRIPT, SCRIPT.replace(b'h:match_value("Host", "(unclosed")',
                                                           b'hh.regex("(unclosed")')], ids=["match_value", "regex"])
def test_a_bad_pattern_string_is_reported_at_the_plug_in_s_line(script):
    """HTTPHeader:match_value(name, "(unclosed") (and httpheader.regex): T.re2's "bad pattern" error names the line
    of the plug-in script that called it, as T.re2("(unclosed") does and the other API errors of engine/plugins/*.lua
    (error(msg, level)).  Before, it named httpheader.lua:27, where the pattern string was compiled.  Twice: a bad
    pattern is not cached."""
    line = script.split(b"\n").index(next(x for x in script.split(b"\n") if b"(unclosed" in x)) + 1
    run = ev("function(src) return pcall(assert(load(src, '@probe_script.lua'))) end")
    for _ in range(2):
        ok, err = run(script)
        assert ok is False and err == (b"probe_script.lua:%d: T.re2: bad pattern '(unclosed': missing ): (unclosed"
                                       % line), err
    ok, err = ev("function() return pcall(T.re2, '(unclosed') end")()
    assert ok is False and err == b"T.re2: bad pattern '(unclosed': missing ): (unclosed"     # the same words


TEXT = st.text(alphabet="abc\r\n", max_size=40)
PATTERNS = st.lists(st.text(alphabet="abc\r\n", min_size=1, max_size=4), min_size=1, max_size=6, unique=True)


@given(PATTERNS, TEXT)
@settings(max_examples=300, deadline=None)
def test_ac_match_all_and_one_against_a_find_model(patterns, text):
    f = ev("""function(pats, s)
        local ac = T.ac(pats)
        local all, one, a, o = ac:match_all(s), ac:match_one(s), {}, {}
        for k, v in pairs(all) do a[#a + 1] = k; a[#a + 1] = v end
        for k, v in pairs(one) do o[#o + 1] = k; o[#o + 1] = v end
        return a, o
      end""")
    pats = vm().table_from([p.encode() for p in patterns])
    a, o = f(pats, text.encode())
    a, o = list(a.values()), list(o.values())
    got = dict(zip(a[0::2], a[1::2]))
    # pos = 1-based position of the last byte of the pattern's first occurrence
    want = {p.encode(): text.find(p) + len(p) for p in patterns if p in text}
    assert got == want
    if not want:
        assert o == []
    else:
        assert len(o) == 2 and o[1] == min(want.values()) and want[o[0]] == o[1]


def test_ac_pos_reads_like_trisul_ac_httplog():
    f = ev("""function(s) local t = T.ac({"Host: "}):match_all(s); return s:sub(t["Host: "] + 1) end""")
    assert f(b"GET / HTTP/1.1\r\nHost: example.com") == b"example.com"
