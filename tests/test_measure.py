"""tools/measure.py: a process tree's peak memory counts each address space once."""
from __future__ import annotations

import sys

from tools.measure import measure

MB = 10**6

# Allocates `hold` MB (touched, so resident), then forks a child that sleeps without touching anything (it shares
# every page with its parent, as a vfork child before exec does) or that allocates `own` MB of its own.
SCRIPT = """
import os, sys, time
hold, own = int(sys.argv[1]), int(sys.argv[2])
block = bytearray(hold * 10**6)
for i in range(0, len(block), 4096):
    block[i] = 1
pid = os.fork()
if pid == 0:
    if own:
        mine = bytearray(own * 10**6)
        for i in range(0, len(mine), 4096):
            mine[i] = 1
    time.sleep(1.0)
    os._exit(0)
os.waitpid(pid, 0)
"""


def peak_above_python(hold: int, own: int) -> float:
    floor = measure([sys.executable, "-c", "pass"]).peak_anon
    return (measure([sys.executable, "-c", SCRIPT, str(hold), str(own)], interval=0.02).peak_anon - floor) / MB


def test_a_child_sharing_its_parents_pages_is_not_counted_twice():
    above = peak_above_python(300, 0)
    assert 280 <= above < 360, f"{above:.0f} MB for 300 MB held by a parent and shared with its forked child"


def test_a_child_with_memory_of_its_own_is_counted():
    above = peak_above_python(300, 200)
    assert above >= 480, f"{above:.0f} MB for 300 MB in a parent and 200 MB allocated by its child"
