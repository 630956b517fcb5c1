"""How parts of one counter (group, bucket, key, meter) from several sources combine, by meter type.

A bucket's value of one counter can come in several parts: from several plug-in VMs of one fast path (the
backend instances, `--backend-instances`, and every frontend script type updating the same group), from
several shards (`--shards N`, one store writer each), from a restarted daemon fast path or an `--append` run.
Adding the parts is right for COUNTER and RUNNING_COUNTER only (each VM carries its own running total), so
engine.lua `take_counters` writes the state a merge needs with every row of another meter type. The parts are
of different VMs: one VM writes each bucket once (take_counters holds buckets pending T.async results may write in,
and never reopens one it wrote), since two parts of one VM would count a RUNNING_COUNTER's total twice:

    (guid, bucket_ts, key, meter, value)                                          COUNTER, RUNNING_COUNTER
    (guid, bucket_ts, key, meter, value, vartype, total, divisor, sample_us)       every other type

Meter types are `T.K.vartype` numbers (docs.trisul.org/docs/lua/obj_globalt; docs/reference.md `T`):

| vartype | value | total | divisor | sample_us | merge of two parts |
|---|---|---|---|---|---|
| 1 RATE_COUNTER | total / divisor | sum of the samples | bucket seconds | 0 | totals added, value = total / divisor |
| 2 GAUGE | last sample | 0 | 0 | packet time of that sample, µs | the later sample (the larger value on a tie) |
| 4 AVERAGE | total / divisor | sum of the samples | number of samples | 0 | totals and counts added, value = total / count |
| 5 DELTA_RATE_COUNTER | total / divisor | c2 - c1 of the part | bucket seconds | 0 | deltas added (each VM is fed its own running total) |
| 6 MAXIMUM | the largest sample | 0 | 0 | 0 | the larger |
| 7 MINIMUM | the smallest sample | 0 | 0 | 0 | the smaller |

Merging in any order gives the value one VM would have computed from all the samples (an AVERAGE from the
sum and count, never from the parts' means). The same rules run in two places, kept together here:
`merge_rows` (one fast path: the parts of its VMs before monitors and the writer see them) and `UPSERT_SET`
(the SQLite upsert: parts from other writers, shards, earlier runs).
"""
from __future__ import annotations

COUNTER, RATE_COUNTER, GAUGE, RUNNING_COUNTER, AVERAGE, DELTA_RATE_COUNTER, MAXIMUM, MINIMUM = range(8)
MERGED = (RATE_COUNTER, GAUGE, AVERAGE, DELTA_RATE_COUNTER, MAXIMUM, MINIMUM)   # rows with 9 fields


def merge_pair(a: tuple, b: tuple) -> tuple:
    """Two parts (rows of the same guid, bucket, key, meter) -> the combined row (same shape)."""
    if len(a) < 9 or len(b) < 9:
        return a[:4] + (a[4] + b[4],) + a[5:]
    vt = a[5]
    if vt == MAXIMUM:
        return a if a[4] >= b[4] else b
    if vt == MINIMUM:
        return a if a[4] <= b[4] else b
    if vt == GAUGE:
        return a if (a[8], a[4]) >= (b[8], b[4]) else b
    total = a[6] + b[6]
    divisor = a[7] + b[7] if vt == AVERAGE else a[7]
    return a[:4] + (total / divisor, vt, total, divisor, a[8])


def merge_rows(rows: list) -> list:
    """Counter rows (5 or 9 fields, see above) with each (guid, bucket, key, meter) once: parts merged by meter
    type, in first-seen order. A counter that came in one part is returned unchanged (the same tuple)."""
    seen: dict = {}
    for r in rows:
        k = (r[0], r[1], r[2], r[3])
        old = seen.get(k)
        seen[k] = tuple(r) if old is None else merge_pair(old, tuple(r))
    return list(seen.values())


# The upsert's SET clause (SQLite evaluates every expression on the stored row before any is changed).
# A row stored by an older luaprobe has NULL vartype/total/divisor: it merges as a COUNTER, as it was written.
UPSERT_SET = """value = CASE excluded.vartype
    WHEN 6 THEN max(value, excluded.value)
    WHEN 7 THEN min(value, excluded.value)
    WHEN 2 THEN CASE WHEN excluded.sample_us > coalesce(sample_us, 0)
                       OR (excluded.sample_us = sample_us AND excluded.value > value) THEN excluded.value ELSE value END
    WHEN 4 THEN (coalesce(total, value) + excluded.total) * 1.0 / (coalesce(divisor, 1) + excluded.divisor)
    WHEN 1 THEN (coalesce(total, value * excluded.divisor) + excluded.total) * 1.0 / excluded.divisor
    WHEN 5 THEN (coalesce(total, value * excluded.divisor) + excluded.total) * 1.0 / excluded.divisor
    ELSE value + excluded.value END,
  total = CASE WHEN excluded.vartype IN (1, 4, 5)
               THEN coalesce(total, value * CASE excluded.vartype WHEN 4 THEN 1 ELSE excluded.divisor END)
                    + excluded.total END,
  divisor = CASE excluded.vartype WHEN 4 THEN coalesce(divisor, 1) + excluded.divisor ELSE excluded.divisor END,
  sample_us = CASE WHEN excluded.vartype = 2 AND (excluded.sample_us > coalesce(sample_us, 0)
                       OR (excluded.sample_us = sample_us AND excluded.value > value))
                   THEN excluded.sample_us ELSE sample_us END,
  vartype = excluded.vartype"""

__all__ = ["MERGED", "merge_pair", "merge_rows", "UPSERT_SET"]
