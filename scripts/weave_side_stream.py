"""Weave a side stream into a single-stream training trace, to test how policies hand memory
between streams (gpumem replay --check-streams). Python 3, standard library only:

    python3 scripts/weave_side_stream.py IN.jsonl[.gz] OUT.jsonl[.gz] [--stream 7] [--every N]
        [--long-mib 48.3] [--seed 1] [--move K]

The recorded traces of testdata/ run on one stream. This adds, as a program with a side
stream (a prefetcher, a communication stream) would:

- one long-lived block on the side stream, allocated early (after the first 2% of the
  events) and freed at the end;
- in every step, a short-lived block on the side stream (4 KiB-8 MiB, log-uniform, a
  different size each step) that lives for about a quarter of a step and whose free waits for the main stream
  (a `free_requested` whose `free_completed` comes later: the format's record_stream);
- in every step, three blocks of the main stream whose free likewise waits for another
  stream (their `free_completed` moved up to 200 events later, never past the next
  allocation at the same address);
- with --move K, the allocations of one size in K (the same sizes in every step, chosen by a
  hash of the size) run on the side stream too: memory then passes between the streams all
  the time, as blocks of both are freed and allocated.

Steps are found from the trace's periodicity: the smallest period (in allocations) with
which the second half's allocation sizes repeat (at least 80% of them); failing that, or with
--every, every N events. The recorded run's stats (the last line) are dropped: they no
longer describe the trace. The output is deterministic for a given input and seed.
"""
import argparse
import gzip
import json
import random
import zlib

MIB = 1 << 20
# Addresses of the new blocks: far below those CUDA hands out (0x7f..), unique per block.
BASE = 0x7000_0000_0000
SLOT = 1 << 30


def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        lines = [json.loads(l) for l in f if l.strip()]
    return [e for e in lines if "a" in e]


def write(path, events):
    text = "".join(json.dumps(e) + "\n" for e in events).encode()
    with open(path, "wb") as f:
        if path.endswith(".gz"):
            # no name and no time in the header: the same input gives the same bytes
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=9, mtime=0) as z:
                z.write(text)
        else:
            f.write(text)


def period(events):
    """The step length in allocations, from the repetition of allocation sizes, or None."""
    sizes = [e["s"] for e in events if e["a"] == "alloc"]
    n = len(sizes)
    if n < 64:
        return None
    half = sizes[n // 2:]
    k = 8
    probe = tuple(sizes[-k:])
    # the distances back to earlier occurrences of the last eight sizes, shortest first
    for start in range(n - k - 1, n // 4, -1):
        if tuple(sizes[start:start + k]) != probe:
            continue
        p = n - k - start
        if p < 16:
            continue
        same = sum(1 for i in range(len(half) - p) if half[i] == half[i + p])
        if same >= 0.8 * (len(half) - p):
            return p
    return None


def step_starts(events, every):
    """Event indices where the steps begin."""
    if not every:
        p = period(events)
        if p:
            allocs = [i for i, e in enumerate(events) if e["a"] == "alloc"]
            # the last step ends at the last allocation; count steps back from there
            first = (len(allocs) - 1) % p
            return [allocs[j] for j in range(first, len(allocs), p)]
        every = max(1, len(events) // 24)
    return list(range(0, len(events), every))


def weave(events, stream, every, long_mib, seed, move=0):
    rng = random.Random(seed)
    starts = step_starts(events, every)
    step_len = max(8, (starts[1] - starts[0]) if len(starts) > 1 else len(events) // 8)
    # where each address is next allocated, to keep delayed frees before it
    next_alloc = [len(events)] * len(events)
    seen = {}
    for i in range(len(events) - 1, -1, -1):
        e = events[i]
        if e["a"] == "alloc":
            seen[e["p"]] = i
        elif e["a"] == "free_completed":
            next_alloc[i] = seen.get(e["p"], len(events))
    # (position, order, event): inserted before the original event at that position
    extra = []
    moved = {}  # original index of a free_completed -> the new position
    slot = [0]

    def new_addr():
        slot[0] += 1
        return BASE + slot[0] * SLOT

    def between_a_pair(pos):
        # a free_requested and its free_completed together are a plain free: keep them so
        return (0 < pos < len(events) and events[pos]["a"] == "free_completed"
                and events[pos - 1]["a"] == "free_requested" and events[pos - 1]["p"] == events[pos]["p"])

    def add(pos, order, a, p, s):
        pos = min(pos, len(events))
        pos += between_a_pair(pos)
        us = events[min(pos, len(events) - 1)].get("us", 0)
        extra.append((pos, order, {"a": a, "p": p, "s": s, "t": stream, "us": us}))

    early = len(events) // 50
    long_addr, long_size = new_addr(), int(long_mib * MIB) // 512 * 512
    add(early, 0, "alloc", long_addr, long_size)
    for k, start in enumerate(starts):
        at = start + rng.randrange(max(1, step_len // 4))
        size = int(2 ** rng.uniform(12, 23)) // 512 * 512
        p = new_addr()
        add(at, 1, "alloc", p, size)
        free_at = at + step_len // 4
        add(free_at, 2, "free_requested", p, size)
        add(free_at + 50, 3, "free_completed", p, size)
        # three frees of the main stream in this step wait for the side stream
        end = starts[k + 1] if k + 1 < len(starts) else len(events)
        frees = [i for i in range(start, end)
                 if events[i]["a"] == "free_requested" and i + 1 < len(events)
                 and events[i + 1]["a"] == "free_completed" and events[i + 1]["p"] == events[i]["p"]]
        for i in rng.sample(frees, min(3, len(frees))):
            to = min(i + 1 + 200, next_alloc[i + 1])
            to += between_a_pair(to)
            if to - (i + 1) >= 3 and to <= next_alloc[i + 1]:
                moved[i + 1] = to
    for i, to in moved.items():
        extra.append((to, 4, events[i]))
    add(len(events), 5, "free_requested", long_addr, long_size)
    add(len(events), 6, "free_completed", long_addr, long_size)
    extra.sort(key=lambda x: (x[0], x[1]))
    if move:
        # the same sizes every step, so that the step still repeats
        for e in events:
            if e["a"] == "alloc" and zlib.crc32(str(e["s"]).encode()) % move == 0:
                e["t"] = stream
    out, j = [], 0
    for i, e in enumerate(events):
        while j < len(extra) and extra[j][0] <= i:
            out.append(extra[j][2])
            j += 1
        if i not in moved:
            out.append(e)
    out.extend(x[2] for x in extra[j:])
    return out, len(starts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--stream", type=int, default=7, help="the side stream's id (default 7)")
    ap.add_argument("--every", type=int, default=0, help="a step every N events (default: found)")
    ap.add_argument("--long-mib", type=float, default=48.3, help="the long-lived block's size in MiB")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--move", type=int, default=0, metavar="K",
                    help="also run the allocations of one size in K (by a hash of the size) on the side stream")
    a = ap.parse_args()
    events = read(a.input)
    out, steps = weave(events, a.stream, a.every, a.long_mib, a.seed, a.move)
    write(a.output, out)
    print(f"{a.output}: {len(out)} events ({len(out) - len(events)} added) over {steps} steps")


if __name__ == "__main__":
    main()
