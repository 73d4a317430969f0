"""Crash safety of aios_rt.MemoryStore: a writing process is SIGKILLed at
random moments, over and over, on one growing store; after every kill the store
opens cleanly with every acknowledged memory (and deletion), and an operation
that was in flight is either wholly there or wholly absent. A read-only
process following a writer with refresh() only ever sees whole batches.

Every child prints a line before an operation ("begin ...") and after it
returns ("ok ..."): an "ok" line is an acknowledgement; a "begin" without its
"ok" is the one operation that may or may not have happened."""

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import aios_rt
from aios_rt import MemoryStore

DIM = 16
ROUNDS = 30

# argv: store dir, seed, first index, mode (add | delete | compact), ids it may delete ("1,5,9").
CHILD_SCRIPT = r"""
import random, sys
import numpy as np
from aios_rt import MemoryStore

def vec(i):
    return np.random.default_rng(i).standard_normal(16).astype(np.float32)

path, seed, i, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
deletable = [int(x) for x in sys.argv[5].split(",") if x]
rng = random.Random(seed)
mem = MemoryStore(path, dim=16)
print("ready", flush=True)
while True:
    r = rng.random()
    if mode in ("delete", "compact") and deletable and r < 0.2:
        victims = rng.sample(deletable, min(len(deletable), rng.randint(1, 3)))
        for v in victims:
            deletable.remove(v)
        print("begin delete " + ",".join(map(str, victims)), flush=True)
        mem.delete(victims)
        print("ok delete", flush=True)
    elif mode == "compact" and r < 0.35:
        print("begin compact", flush=True)
        dropped = mem.compact()
        print(f"ok compact {dropped}", flush=True)
    else:
        n = 3 if rng.random() < 0.3 else 1
        idx = list(range(i, i + n))
        i += n
        print("begin add " + ",".join(map(str, idx)), flush=True)
        if n == 1:
            ids = [mem.add(f"memory {idx[0]}", meta={"i": idx[0]}, vector=vec(idx[0]))]
        else:
            ids = mem.add_many([f"memory {j}" for j in idx], [{"i": j} for j in idx], np.stack([vec(j) for j in idx]))
        print("ok add " + ",".join(map(str, ids)), flush=True)
"""

# argv: store dir, seconds. Appends batches of 1..5 for that long, then exits.
WRITER_SCRIPT = r"""
import random, sys, time
import numpy as np
from aios_rt import MemoryStore

path, seconds = sys.argv[1], float(sys.argv[2])
rng = random.Random(7)
mem = MemoryStore(path, dim=16)
print("ready", flush=True)
end = time.time() + seconds
j = 0
while time.time() < end:
    n = rng.randint(1, 5)
    v = np.random.default_rng(j).standard_normal((n, 16)).astype(np.float32)
    ids = mem.add_many([f"batch item {j + t}" for t in range(n)], vectors=v)
    j += n
    print(f"ok {ids[0]} {ids[-1]}", flush=True)
print("done", flush=True)
"""


def vec(i):
    return np.random.default_rng(i).standard_normal(DIM).astype(np.float32)


class Child:
    """A child process whose stdout lines are collected by a thread."""

    def __init__(self, script, args, tmp_path):
        self.stderr = open(tmp_path / f"stderr-{time.monotonic_ns()}.txt", "w+")
        env = dict(os.environ, RAYON_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                                     stderr=self.stderr, text=True, env=env)
        self.lines, self.queue = [], queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self.queue.put(line.rstrip("\n"))
        self.queue.put(None)

    def wait_for(self, what, timeout=60):
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line == what:
                return
            if line is None:
                self.stderr.seek(0)
                raise AssertionError(f"child ended or stalled before {what!r}: {self.lines[-5:]}\n{self.stderr.read()}")

    def kill(self):
        alive = self.proc.poll() is None
        if alive:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.thread.join(timeout=60)
        self.stderr.seek(0)
        err = self.stderr.read()
        self.stderr.close()
        return alive, err

    def finish(self, timeout=60):
        rc = self.proc.wait(timeout=timeout)
        self.thread.join(timeout=60)
        self.stderr.seek(0)
        err = self.stderr.read()
        self.stderr.close()
        return rc, err


def check_store(path, live, deleted, focus=None, sample=200, rng=None):
    """Opens the store for writing (as the next session would) and checks it against
    `live` {id: index} and `deleted`: exactly these memories, each with its text and meta;
    the ids in `focus` (default: all) and `sample` others are found by their vectors."""
    mem = MemoryStore(path, dim=DIM)
    assert mem.warnings == []
    ids = sorted(h.id for h in mem.search(np.ones(DIM), k=10**6))
    assert ids == sorted(live), (set(ids) ^ set(live))
    assert len(mem) == len(live)
    for id_, i in live.items():
        h = mem.get(id_)
        assert h is not None and h.text == f"memory {i}" and h.meta == {"i": i}, (id_, i, h)
    if focus is None:
        by_vector = list(live)
    else:
        rest = sorted(set(live) - set(focus))
        by_vector = [i for i in focus if i in live] + (rng or random).sample(rest, min(sample, len(rest)))
    for id_ in by_vector:
        top = mem.search(vec(live[id_]), k=1)[0]
        assert top.id == id_ and top.score > 0.9999, (id_, top)
    for id_ in deleted:
        assert mem.get(id_) is None
    names = [p.name for p in Path(path).iterdir()]
    assert not [n for n in names if n.startswith(".tmp-")], names  # a writable open removes leftovers
    assert len([n for n in names if n.startswith("MANIFEST-")]) <= 3, names
    return mem


def present(path, ids):
    """Which of `ids` a fresh read-only handle finds, with their texts and metas."""
    mem = MemoryStore(path, read_only=True)
    return {i: (h.text, h.meta) for i in ids if (h := mem.get(i)) is not None}


def test_sigkill_while_writing_loses_nothing_acknowledged(tmp_path, record_property):
    path = tmp_path / "store"
    rng = random.Random(20250401)
    live, deleted = {}, set()  # id -> index of its vector/text
    max_id = 0  # the largest id ever committed: the next add must get max_id + 1
    next_index = 0
    stats = {"kills": 0, "in_flight_add_kept": 0, "in_flight_add_gone": 0, "in_flight_delete_kept": 0,
             "in_flight_delete_gone": 0, "in_flight_compact": 0, "acked_ops": 0, "compactions": 0}
    check_store(path, live, deleted)  # creates the store
    for rnd in range(ROUNDS):
        first_new = max_id + 1
        mode = ("add", "delete", "compact")[rnd % 3]
        victims = sorted(rng.sample(sorted(live), min(len(live), 12))) if mode != "add" else []
        child = Child(CHILD_SCRIPT, [path, rnd, next_index, mode, ",".join(map(str, victims))], tmp_path)
        child.wait_for("ready")
        time.sleep(rng.uniform(0.05, 0.6))
        alive, err = child.kill()
        assert alive, f"the child exited by itself:\n{err}"
        stats["kills"] += 1

        # Replay what the child acknowledged.
        in_flight = None
        for line in child.lines[1:]:
            words = line.split()
            if words[0] == "begin":
                assert in_flight is None, child.lines
                in_flight = words[1:]
                if words[1] == "add":
                    next_index = max(next_index, max(map(int, words[2].split(","))) + 1)
                continue
            assert words[0] == "ok" and in_flight is not None and words[1] == in_flight[0], (line, child.lines)
            stats["acked_ops"] += 1
            if words[1] == "add":
                ids = [int(x) for x in words[2].split(",")]
                indices = [int(x) for x in in_flight[1].split(",")]
                assert ids == list(range(max_id + 1, max_id + 1 + len(ids))), (ids, max_id)  # no gap, no reuse
                live.update(zip(ids, indices))
                max_id = ids[-1]
            elif words[1] == "delete":
                for id_ in map(int, in_flight[1].split(",")):
                    del live[id_]
                    deleted.add(id_)
            else:
                stats["compactions"] += 1
                assert int(words[2]) >= 0
            in_flight = None

        # The one operation cut short: all or nothing.
        if in_flight and in_flight[0] == "add":
            indices = [int(x) for x in in_flight[1].split(",")]
            ids = list(range(max_id + 1, max_id + 1 + len(indices)))
            found = present(path, ids + [max_id + len(indices) + 1])
            assert len(found) in (0, len(ids)), (found, in_flight)  # add_many is atomic
            if found:
                assert found == {id_: (f"memory {i}", {"i": i}) for id_, i in zip(ids, indices)}
                live.update(zip(ids, indices))
                max_id = ids[-1]
                stats["in_flight_add_kept"] += 1
            else:
                stats["in_flight_add_gone"] += 1
        elif in_flight and in_flight[0] == "delete":
            ids = [int(x) for x in in_flight[1].split(",")]
            found = present(path, ids)
            assert len(found) in (0, len(ids)), (found, in_flight)  # a delete is atomic
            if not found:
                for id_ in ids:
                    del live[id_]
                    deleted.add(id_)
                stats["in_flight_delete_gone"] += 1
            else:
                stats["in_flight_delete_kept"] += 1
        elif in_flight:
            stats["in_flight_compact"] += 1

        last_round = rnd == ROUNDS - 1
        mem = check_store(path, live, deleted, None if last_round else range(first_new, max_id + 1), rng=rng)
        # Nothing beyond what was committed: the next id is max_id + 1.
        assert mem.get(max_id + 1) is None
        del mem

    # A final check with a read-only handle, and one more write.
    ro = MemoryStore(path, read_only=True)
    assert sorted(h.id for h in ro.search(np.ones(DIM), k=10**6)) == sorted(live)
    del ro
    mem = MemoryStore(path, dim=DIM)
    assert mem.add("after the storm", vector=np.ones(DIM)) == max_id + 1

    record_property("kills_survived", stats["kills"])
    for k, v in stats.items():
        record_property(k, v)
    print(f"\nSIGKILL rounds survived: {stats['kills']}; memories live {len(live)}, deleted {len(deleted)}; {stats}")
    assert stats["kills"] == ROUNDS >= 25
    assert stats["acked_ops"] >= ROUNDS  # the children did real work between kills
    assert len(live) > 50 and len(deleted) > 5 and stats["compactions"] > 0
    # Kills landed mid-operation (the point of the test), not only between operations.
    assert stats["in_flight_add_kept"] + stats["in_flight_add_gone"] + stats["in_flight_delete_kept"] \
        + stats["in_flight_delete_gone"] + stats["in_flight_compact"] >= ROUNDS // 2


def test_reader_process_sees_only_whole_batches(tmp_path):
    path = tmp_path / "store"
    writer = Child(WRITER_SCRIPT, [path, 3.0], tmp_path)
    writer.wait_for("ready")
    # The writer holds the lock: a second writer is refused, readers are welcome.
    with pytest.raises(aios_rt.InputError, match="open for writing elsewhere"):
        MemoryStore(path, dim=DIM)
    ro = MemoryStore(path, read_only=True)
    probe = np.ones(DIM, np.float32)
    seen, last = [], 0
    while writer.proc.poll() is None:
        changed = ro.refresh()
        hits = ro.search(probe, k=10**6, precision="int8" if len(seen) % 2 else "f32")
        ids = sorted(h.id for h in hits)
        n = len(ids)
        assert ids == list(range(1, n + 1)), ids  # no gaps
        assert n >= last  # never backwards
        assert changed or n == last  # refresh() says when something changed
        assert len(ro) == n
        seen.append(n)
        last = n
    rc, err = writer.finish()
    assert rc == 0, err
    assert writer.lines[-1] == "done"
    batch_ends = {0} | {int(line.split()[2]) for line in writer.lines if line.startswith("ok ")}
    starts = [int(line.split()[1]) for line in writer.lines if line.startswith("ok ")]
    ends = sorted(batch_ends - {0})
    assert starts == [1] + [e + 1 for e in ends[:-1]]  # the writer's ids are contiguous
    # Every snapshot the reader saw ends at a batch boundary: no partial batch.
    assert set(seen) <= batch_ends, sorted(set(seen) - batch_ends)
    assert len(set(seen)) >= 5, seen  # the reader really followed the writer
    ro.refresh()
    assert len(ro) == ends[-1]
    for id_ in (1, ends[-1]):
        assert ro.get(id_).text.startswith("batch item ")
