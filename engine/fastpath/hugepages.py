"""The flow table's page size: the ``huge_pages`` setting (``--huge-pages``, ``[fastpath] huge_pages``).

The flow table's arrays from 2 MiB on (hot and cold records, LRU links, the index, the free stack) are
anonymous mappings that the kernel zero-fills as flows first write them (engine/fastpath/flowtable.lua
``alloc``).  With transparent huge pages each first write to a 2 MiB page clears the whole page at once and
later record accesses miss the TLB less; on a virtual machine whose balloon hands free memory back to its host
(virtio balloon *free page reporting*), that first write also faults in the host, and costs from run to run
anywhere between 0.07 and 1.8 ms per 2 MiB.  Measured there (docs/benchmarks.md "The flow table's huge_pages setting",
10 alternating runs a side, loop CPU ns per packet min / median / max): flows-1m 148 / 570 / 653 with huge pages
against 231 / 237 / 265 with 4 KiB pages, flows-100k 177 / 337 / 415 against 215 / 225 / 236, dns 93 / 164 / 194
against 105 / 112 / 123, mixed-zipf and small-few the same either way (a second round, where the slow mode was rarer:
dns 99 / 115.5 / 196 against 115 / 123.5 / 125, i.e. 4 KiB pages give up the huge pages' best case, ~7 % of median
there, for a spread <= 1.21 in every cell); so ``auto`` takes 4 KiB pages there.  A machine without free page
reporting keeps the huge pages' best case (their TLB reach) every run.

Setting values (a string):

* ``on``: ``MADV_HUGEPAGE`` (the kernel gives huge pages when its THP mode is ``always`` or ``madvise``).
* ``off``: ``MADV_NOHUGEPAGE``: 4 KiB pages even when the kernel's THP mode is ``always``.
* ``auto`` (default): ``off`` when the machine reports free memory to its host (a virtio balloon device,
  bound to its driver, that negotiated ``VIRTIO_BALLOON_F_REPORTING``, feature bit 5, in
  ``/sys/bus/virtio/devices/*/features``), else ``on``.

:func:`decide` gives the decision and its reason, shown once in the run summary (``flow_table_pages``).
Sources: Linux Documentation/admin-guide/mm/transhuge.rst (MADV_HUGEPAGE 14, MADV_NOHUGEPAGE 15, smaps
VmFlags ``hg`` / ``nh``); include/uapi/linux/virtio_balloon.h (VIRTIO_BALLOON_F_REPORTING 5),
include/uapi/linux/virtio_ids.h (VIRTIO_ID_BALLOON 5); drivers/virtio/virtio.c (``features``: one '0' / '1'
character per feature bit, bit 0 first).
"""
from __future__ import annotations

import os

VALUES = ("auto", "on", "off")
SETTING_HELP = ("flow table pages: 'on' (transparent huge pages, MADV_HUGEPAGE), 'off' (4 KiB pages, "
                "MADV_NOHUGEPAGE) or 'auto': 'off' on a virtual machine whose balloon reports free memory to its host, "
                "else 'on' (engine/fastpath/hugepages.py)")

VIRTIO_ID_BALLOON = 5
VIRTIO_BALLOON_F_REPORTING = 5


def parse(text: str) -> str:
    """``"auto"``, ``"on"`` or ``"off"`` (case and surrounding blanks ignored).  Raises ValueError with a one-line
    reason for anything else."""
    t = str(text).strip().lower()
    if t not in VALUES:
        raise ValueError(f"{text!r}: must be 'auto', 'on' or 'off'")
    return t


def balloon_reporting(root: str = "/") -> str | None:
    """The virtio device (e.g. ``"virtio0"``) of a balloon with free page reporting under ``root`` (a sysfs
    tree: ``root/sys/bus/virtio/devices/NAME/{device,features,driver}``), or None.

    A device counts when its ``device`` id is 5 (balloon), it is bound to a driver (``driver`` link present),
    and character 5 of its ``features`` (the negotiated feature bits, bit 0 first) is ``1``.  Missing or
    unreadable files count as "no" (not Linux, no virtio, a restricted /sys)."""
    base = os.path.join(root, "sys", "bus", "virtio", "devices")
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return None
    for name in names:
        dev = os.path.join(base, name)
        try:
            with open(os.path.join(dev, "device")) as f:
                device = int(f.read().strip(), 0)
            with open(os.path.join(dev, "features")) as f:
                features = f.read().strip()
        except (OSError, ValueError):
            continue
        if (device == VIRTIO_ID_BALLOON and len(features) > VIRTIO_BALLOON_F_REPORTING
                and features[VIRTIO_BALLOON_F_REPORTING] == "1" and os.path.exists(os.path.join(dev, "driver"))):
            return name
    return None


def decide(setting: str, root: str = "/") -> dict:
    """``{"setting": ..., "huge_pages": bool, "reason": str}`` for a setting value (see the module's docstring);
    ``root``: the filesystem root whose /sys is read (tests pass a directory)."""
    s = parse(setting)
    if s != "auto":
        return {"setting": s, "huge_pages": s == "on", "reason": f"huge_pages = {s}"}
    dev = balloon_reporting(root)
    if dev is not None:
        return {"setting": s, "huge_pages": False,
                "reason": f"auto: the virtio balloon {dev} reports free memory to the host (free page reporting), "
                          "so a first write to a fresh 2 MiB page may fault in the host too: 4 KiB pages"}
    return {"setting": s, "huge_pages": True,
            "reason": "auto: no virtio balloon with free page reporting: transparent huge pages"}
