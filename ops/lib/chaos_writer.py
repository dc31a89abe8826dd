#!/usr/bin/python3
"""Writer and verifier for ops/chaos-kill9 and ops/chaos-cluster (libnbd's Python module).

ops/chaos-cluster runs one writer per cluster node (distinct --seq-base), stops them with
--stop FILE (they drain what is in flight), and verifies their state files together (--state
A,B): ticks are CLOCK_MONOTONIC ns, so requests of different processes order. There,
--acked-durable (graceful rounds) checks every acknowledged write, --flush-errors-void (kill -9,
SIGSTOP) lets a failed FLUSH void the durability of the writes acknowledged before it, and the
verify line adds timing (longest request, longest gap without a reply) and error counts.

  chaos_writer.py write  --uri URI --cycle C --state FILE --ready FILE [--connections K] ...
  chaos_writer.py verify --uri URI --cycle C --state FILE --model FILE --bitmaps NAME:BYTES,...

The export is modelled in 4 KiB units. Every write covers whole units, and each unit it writes
holds (write id, unit number) repeated, so a unit read back names the write whose data it holds
and where that write meant it to go. Write ids are cycle * 10^7 + sequence; 0 is the export's
initial zeros.

`write` opens K connections to one export (multi-conn), keeps DEPTH requests in flight on each
(aio, one select loop, no threads), and writes 4 KiB-256 KiB blocks at random 4 KiB-aligned
offsets, some with FUA, with a FLUSH on each connection every few writes, until the connections
die (the gateway is killed) or --max-seconds. Every request and every reply is appended to the
state file (fsync'd every 50 ms and at exit) with ticks of one counter: a tick is taken just
before a request is sent and just after its reply is read. A write is *durable* when it was
acknowledged with FUA, or acknowledged before (ack tick < send tick) a FLUSH that was
acknowledged, on any connection (NBD_FLAG_CAN_MULTI_CONN: a flush covers every write the server
completed before it received the flush).

`verify` (after the restart) applies the cycle to the model and reads the whole export back.
For each unit the model keeps the set of writes whose data it may hold, and whether it must hold
one of them (some durable write covered it; at first, the initial zeros). A durable write d in
this cycle makes the set {writes covering the unit that were not acknowledged before d was
sent}: writes acknowledged before d was sent are older than d and may not show; writes in flight
with d, or later, may (NBD orders nothing between them). A unit without a durable write this
cycle adds the cycle's writes to its set. Any unit that must hold one of its set and holds
something else (an older write, zeros, another unit's data, a torn mix) is a loss.

Bitmaps are cleared by the driver before each cycle, so after the restart every granule of every
write acknowledged this cycle, and every granule whose data shows a write of this cycle that
landed without its reply, must be dirty in every bitmap (the crash guarantee in README "Dirty
bitmaps"). Granules dirty without any write of this cycle sent to them are counted as extra
(over-reporting; not a loss).
"""
import argparse
import json
import os
import pickle
import random
import select
import struct
import sys
import time

import nbd

UNIT = 4096
ID_SCALE = 10_000_000
PAIR = struct.Struct("<QQ")


def unit_data(wid, unit):
    return PAIR.pack(wid, unit) * (UNIT // PAIR.size)


def write_data(wid, offset, length):
    first = offset // UNIT
    return b"".join(unit_data(wid, u) for u in range(first, first + length // UNIT))


# ---------------------------------------------------------------------------------------- write

class Writer:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.tick = 0
        self.seq = args.seq_base
        self.fseq = 0
        self.state = open(args.state, "a", buffering=1)
        self.last_sync = time.monotonic()
        self.counts = dict(sent=0, acked=0, failed=0, fua=0, flushes=0, flushes_acked=0)

    def next_tick(self):
        # CLOCK_MONOTONIC in ns, strictly increasing: ticks of writers in other processes (on
        # other cluster nodes, ops/chaos-cluster) order with these, and a tick is a time.
        self.tick = max(self.tick + 1, time.monotonic_ns())
        return self.tick

    def log(self, line):
        self.state.write(line + "\n")

    def sync(self, force=False):
        now = time.monotonic()
        if force or now - self.last_sync > 0.05:
            self.state.flush()
            os.fsync(self.state.fileno())
            self.last_sync = now

    def issue(self, conn):
        h = conn["h"]
        conn["since_flush"] += 1
        if conn["since_flush"] > conn["flush_every"]:
            conn["since_flush"] = 0
            conn["flush_every"] = self.rng.randint(2, 8)
            self.fseq += 1
            fid = self.fseq
            send = self.next_tick()
            self.log(f"F {fid} {conn['n']} {send}")
            self.counts["flushes"] += 1

            def done(err, fid=fid):
                e = err.value
                if e == 0:
                    self.log(f"FA {fid} {self.next_tick()}")
                    self.counts["flushes_acked"] += 1
                else:
                    self.log(f"FE {fid} {e} {self.next_tick()}")
                return 1
            h.aio_flush(completion=done)
            return
        self.seq += 1
        wid = self.args.cycle * ID_SCALE + self.seq
        length = self.rng.randint(1, 64) * UNIT
        offset = self.rng.randrange(0, (self.args.size - length) // UNIT + 1) * UNIT
        fua = self.rng.random() < self.args.fua
        buf = nbd.Buffer.from_bytearray(bytearray(write_data(wid, offset, length)))
        send = self.next_tick()
        self.log(f"W {wid} {conn['n']} {offset} {length} {int(fua)} {send}")
        self.counts["sent"] += 1
        self.counts["fua"] += int(fua)

        def done(err, wid=wid, buf=buf):
            e = err.value
            if e == 0:
                self.log(f"A {wid} {self.next_tick()}")
                self.counts["acked"] += 1
            else:
                self.log(f"E {wid} {e} {self.next_tick()}")
                self.counts["failed"] += 1
            return 1
        h.aio_pwrite(buf, offset, completion=done, flags=nbd.CMD_FLAG_FUA if fua else 0)

    def run(self):
        a = self.args
        self.log(f"C {a.cycle} {a.size} {a.connections} {a.depth}")
        conns = []
        for n in range(a.connections):
            # A node that is shutting down (downed) may close a new connection in the handshake:
            # try again for up to --connect-seconds (ops/chaos-cluster starts writers right after
            # the cluster is Up again).
            give_up = time.monotonic() + a.connect_seconds
            while True:
                h = nbd.NBD()
                try:
                    h.connect_uri(a.uri)
                    break
                except nbd.Error:
                    if time.monotonic() > give_up:
                        raise
                    time.sleep(0.5)
            if n == 0:
                if h.get_size() != a.size:
                    sys.exit(f"chaos_writer: export size {h.get_size()} != --size {a.size}")
                if not (h.can_multi_conn() and h.can_fua() and h.can_flush()):
                    sys.exit("chaos_writer: the export does not offer multi-conn, FUA and FLUSH")
            conns.append(dict(h=h, n=n, since_flush=0, flush_every=self.rng.randint(2, 8), alive=True))
        for c in conns:
            for _ in range(a.depth):
                self.issue(c)
        self.sync(force=True)
        with open(a.ready, "w") as f:
            f.write("ready\n")
        deadline = time.monotonic() + a.max_seconds
        errors = []
        stopping = None
        while any(c["alive"] for c in conns) and time.monotonic() < deadline:
            # --stop FILE: send nothing more, wait (at most 30 s) for the replies in flight.
            if stopping is None and a.stop and os.path.exists(a.stop):
                stopping = time.monotonic()
            if stopping is not None and (time.monotonic() - stopping > 30 or
                                         all(c["h"].aio_in_flight() == 0 for c in conns if c["alive"])):
                break
            rl, wl = [], []
            fds = {}
            for c in conns:
                if not c["alive"]:
                    continue
                fd = c["h"].aio_get_fd()
                fds[fd] = c
                d = c["h"].aio_get_direction()
                if d & nbd.AIO_DIRECTION_READ:
                    rl.append(fd)
                if d & nbd.AIO_DIRECTION_WRITE:
                    wl.append(fd)
            r, w, _ = select.select(rl, wl, [], 0.1)
            for fd in set(r) | set(w):
                c = fds[fd]
                try:
                    if fd in r:
                        c["h"].aio_notify_read()
                    if fd in w:
                        c["h"].aio_notify_write()
                except nbd.Error as e:
                    errors.append(str(e))
            for c in conns:
                if not c["alive"]:
                    continue
                h = c["h"]
                if h.aio_is_dead() or h.aio_is_closed():
                    c["alive"] = False
                    self.log(f"D {c['n']} {self.next_tick()}")
                    self.counts["died"] = self.counts.get("died", 0) + 1
                    continue
                try:
                    while stopping is None and h.aio_in_flight() < a.depth:
                        self.issue(c)
                except nbd.Error as e:
                    errors.append(str(e))
                    c["alive"] = False
            self.sync()
        for c in conns:
            if c["alive"]:
                try:
                    c["h"].shutdown()
                except nbd.Error:
                    pass
        self.sync(force=True)
        self.state.close()
        out = dict(self.counts)
        out["first_error"] = errors[0] if errors else None
        print(json.dumps(out))


# --------------------------------------------------------------------------------------- verify

def parse_state(paths):
    """One or more writers' state files (comma-separated); flushes are keyed (file, id)."""
    writes, flushes, died = {}, {}, 0
    for n, path in enumerate(paths.split(",")):
        for line in open(path):
            p = line.split()
            if not p:
                continue
            if p[0] == "W":
                wid, conn, off, length, fua, send = map(int, p[1:7])
                writes[wid] = dict(wid=wid, conn=conn, off=off, len=length, fua=bool(fua), send=send, ack=None,
                                   err=None, end=None)
            elif p[0] == "A":
                writes[int(p[1])]["ack"] = writes[int(p[1])]["end"] = int(p[2])
            elif p[0] == "E":
                writes[int(p[1])]["err"] = int(p[2])
                writes[int(p[1])]["end"] = int(p[3]) if len(p) > 3 else None
            elif p[0] == "F":
                flushes[n, int(p[1])] = dict(conn=int(p[2]), send=int(p[3]), ack=None, err=None, end=None)
            elif p[0] == "FA":
                flushes[n, int(p[1])]["ack"] = flushes[n, int(p[1])]["end"] = int(p[2])
            elif p[0] == "FE":
                flushes[n, int(p[1])]["err"] = int(p[2])
                flushes[n, int(p[1])]["end"] = int(p[3]) if len(p) > 3 else None
            elif p[0] == "D":
                died += 1
    return writes, flushes, died


def read_all(h, size, chunk=4 << 20):
    out = bytearray(size)
    view = memoryview(out)
    off = 0
    while off < size:
        n = min(chunk, size - off)
        view[off:off + n] = h.pread(n, off)
        off += n
    return out


def dirty_extents(h, context, size):
    """Dirty byte ranges of one bitmap context, as a list of (offset, length)."""
    extents = []
    off = 0
    while off < size:
        got = []

        def cb(meta, start, entries, err):
            if meta == context:
                got.append((start, entries))
            return 0
        h.block_status(min(size - off, 1 << 30), off, cb)
        progressed = off
        for start, entries in got:
            pos = start
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                if flags & 1:
                    extents.append((pos, length))
                pos += length
            progressed = max(progressed, pos)
        if progressed <= off:
            raise RuntimeError(f"block_status on {context} made no progress at {off}")
        off = progressed
    return extents


def verify(args):
    size = args.size
    units = size // UNIT
    bitmaps = []
    for spec in filter(None, args.bitmaps.split(",")):
        name, gran = spec.split(":")
        bitmaps.append((name, int(gran)))

    if os.path.exists(args.model):
        with open(args.model, "rb") as f:
            model = pickle.load(f)
    else:
        # The export is new and sparse: every unit must read as zeros (write id 0).
        model = dict(cands=[(0,)] * units, anchor=[0] * units, writes={})
    cands, anchor, known = model["cands"], model["anchor"], model["writes"]

    writes, flushes, died = parse_state(args.state)
    last_flush = max((f["send"] for f in flushes.values() if f["ack"] is not None), default=0)
    for w in writes.values():
        w["durable"] = w["ack"] is not None and (w["fua"] or w["ack"] < last_flush)
    if args.flush_errors_void:
        # A FLUSH that failed (the gateway's EIO after an owner died) says writes acknowledged
        # before it may be gone; a later FLUSH's success does not bring them back. A write is
        # durable when FUA, or when a FLUSH sent after its reply succeeded and no FLUSH sent
        # between its reply and that success failed.
        acked_f = sorted((f["send"], f["ack"]) for f in flushes.values() if f["ack"] is not None)
        failed_f = sorted(f["send"] for f in flushes.values() if f["err"] is not None)
        for w in writes.values():
            if w["ack"] is None or w["fua"]:
                continue
            w["durable"] = any(fs > w["ack"] and not any(w["ack"] < x < fa for x in failed_f)
                               for fs, fa in acked_f)
    if args.acked_durable:
        # A graceful handoff loses nothing acknowledged: check every acknowledged write.
        for w in writes.values():
            w["durable"] = w["ack"] is not None

    # The cycle's writes per unit.
    cover = {}
    for w in writes.values():
        first = w["off"] // UNIT
        for u in range(first, first + w["len"] // UNIT):
            cover.setdefault(u, []).append(w)
    flushed_units = 0
    for u, ws in cover.items():
        durable = [w for w in ws if w["durable"]]
        if durable:
            newest = max(durable, key=lambda w: w["send"])
            cands[u] = tuple(w["wid"] for w in ws if w["ack"] is None or w["ack"] > newest["send"])
            anchor[u] = newest["wid"]
            flushed_units += 1
        else:
            cands[u] = tuple(sorted(set(cands[u]) | {w["wid"] for w in ws}))
    for w in writes.values():
        if w["durable"]:
            known[w["wid"]] = {k: w[k] for k in ("wid", "conn", "off", "len", "fua", "send", "ack")}

    h = nbd.NBD()
    for name, _ in bitmaps:
        h.add_meta_context(f"qemu:dirty-bitmap:{name}")
    h.connect_uri(args.uri)
    data = read_all(h, size)

    mismatched_units = []
    lost = set()
    observed = {}
    verified_units = 0
    for u in range(units):
        chunk = data[u * UNIT:(u + 1) * UNIT]
        wid, where = PAIR.unpack_from(chunk)
        if wid == 0 and where == 0 and chunk.count(0) == UNIT:
            got = 0
        elif chunk == unit_data(wid, where) and where == u:
            got = wid
        else:
            got = None  # not one write's data for this unit: torn, misplaced or garbage
        if got:
            observed[u] = got
        if anchor[u] != 0 or u in cover:
            verified_units += 1
        if got is None or got not in cands[u]:
            mismatched_units.append((u, got, wid, where))
            lost.add(anchor[u])

    # Bitmaps: every granule of each acknowledged write of this cycle, and of each unit showing a
    # write of this cycle, must be dirty; granules no write of this cycle was sent to should not be.
    bitmap_out = {}
    missing_total = 0
    for name, gran in bitmaps:
        required, possible = set(), set()
        for w in writes.values():
            g = set(range(w["off"] // gran, (w["off"] + w["len"] - 1) // gran + 1))
            possible |= g
            if w["ack"] is not None:
                required |= g
        for u, wid in observed.items():
            if wid // ID_SCALE == args.cycle:
                required.add(u * UNIT // gran)
        dirty = set()
        for off, length in dirty_extents(h, f"qemu:dirty-bitmap:{name}", size):
            dirty |= set(range(off // gran, (off + length - 1) // gran + 1))
        missing = sorted(required - dirty)
        extra = sorted(dirty - possible)
        missing_total += len(missing)
        bitmap_out[name] = dict(granularity=gran, required=len(required), dirty=len(dirty),
                                total=(size + gran - 1) // gran, missing=len(missing), extra=len(extra),
                                missing_first=[m * gran for m in missing[:5]])
    h.shutdown()

    # Acknowledged but unflushed writes of this cycle whose data is gone (informative: kill -9 may
    # lose them): a unit of the write shows data older than it (zeros, an earlier cycle, or a
    # write acknowledged before it was sent).
    def older(wid, than):
        if wid is None:
            return False
        if wid // ID_SCALE != args.cycle:
            return True
        o = writes.get(wid)
        return o is not None and o["ack"] is not None and o["ack"] < than["send"]
    acked_lost = 0
    for w in writes.values():
        if w["ack"] is None or w["durable"]:
            continue
        first = w["off"] // UNIT
        if any(older(observed.get(u, 0), w) for u in range(first, first + w["len"] // UNIT)):
            acked_lost += 1

    model = dict(cands=cands, anchor=anchor, writes=known)
    tmp = args.model + ".tmp"
    with open(tmp, "wb") as f:
        pickle.dump(model, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, args.model)

    n_acked = sum(1 for w in writes.values() if w["ack"] is not None)
    # Requests' times (ticks are CLOCK_MONOTONIC ns): the longest wait for a reply, the errors,
    # and, after --event-ns (the disruption), when the first request sent after it was acknowledged.
    reqs = list(writes.values()) + list(flushes.values())
    waits = [r["end"] - r["send"] for r in reqs if r["end"] is not None]
    errs = [r for r in reqs if r["err"] is not None]
    timing = dict(
        pause_max_s=round(max(waits, default=0) / 1e9, 3),
        write_errors=sum(1 for w in writes.values() if w["err"] is not None),
        flush_errors=sum(1 for f in flushes.values() if f["err"] is not None),
        unanswered=sum(1 for r in reqs if r["end"] is None and r["err"] is None),
        connections_died=died,
        error_codes=sorted({r["err"] for r in errs}),
    )
    # The longest time without any reply (across all connections of all writers): the service
    # interruption clients saw; restored_s: from --event-ns until the reply that ended it.
    ends = sorted(r["end"] for r in reqs if r["end"] is not None)
    gaps = [(b - a, b) for a, b in zip(ends, ends[1:])]
    if gaps:
        gap, gap_end = max(gaps)
        timing["reply_gap_max_s"] = round(gap / 1e9, 3)
        if args.event_ns:
            timing["restored_s"] = round((gap_end - args.event_ns) / 1e9, 3)
    if args.event_ns:
        after = [r["ack"] for r in reqs if r["ack"] is not None and r["send"] > args.event_ns]
        timing["served_after_s"] = round((min(after) - args.event_ns) / 1e9, 3) if after else None
        if errs:
            timing["first_error_after_s"] = round((min(r["end"] or r["send"] for r in errs) - args.event_ns) / 1e9, 3)
    result = dict(
        cycle=args.cycle,
        writes_sent=len(writes),
        writes_acked=n_acked,
        writes_durable=sum(1 for w in writes.values() if w["durable"]),
        fua_acked=sum(1 for w in writes.values() if w["fua"] and w["ack"] is not None),
        flushes_acked=sum(1 for f in flushes.values() if f["ack"] is not None),
        flushed_bytes=flushed_units * UNIT,
        bytes_verified=verified_units * UNIT,
        bytes_read=size,
        flushed_writes_lost=len(lost),
        mismatched_bytes=len(mismatched_units) * UNIT,
        acked_unflushed_lost=acked_lost,
        granules_missing=missing_total,
        bitmaps=bitmap_out,
        **timing,
    )
    print(json.dumps(result))
    if mismatched_units or missing_total:
        # Details for a reproduction: the first mismatched units and the write each should show.
        for u, got, wid, where in mismatched_units[:10]:
            a = anchor[u]
            src = known.get(a) or writes.get(a) or {}
            print(f"chaos_writer: cycle {args.cycle}: unit at offset {u * UNIT} holds "
                  f"{'write %d' % got if got else ('zeros' if got == 0 else 'unrecognised data (id %d unit %d)' % (wid, where))}, "
                  f"expected one of {list(cands[u])[:6]}; flushed write {a} {json.dumps(src)}", file=sys.stderr)
        for name, b in bitmap_out.items():
            if b["missing"]:
                print(f"chaos_writer: cycle {args.cycle}: bitmap {name} misses {b['missing']} granules, "
                      f"first at offsets {b['missing_first']}", file=sys.stderr)
        return 1
    return 0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["write", "verify"])
    p.add_argument("--uri", required=True)
    p.add_argument("--cycle", type=int, required=True)
    p.add_argument("--state", required=True)
    p.add_argument("--size", type=int, default=256 << 20)
    p.add_argument("--ready")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--fua", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-seconds", type=float, default=60)
    p.add_argument("--model")
    p.add_argument("--bitmaps", default="")
    p.add_argument("--connect-seconds", type=float, default=0, help="write: retry connecting this long")
    p.add_argument("--seq-base", type=int, default=0, help="first write id of this writer within its cycle")
    p.add_argument("--stop", help="write: when this file exists, send nothing more and drain")
    p.add_argument("--acked-durable", action="store_true", help="verify: every acknowledged write must survive")
    p.add_argument("--flush-errors-void", action="store_true",
                   help="verify: a failed FLUSH voids the durability of writes acknowledged before it")
    p.add_argument("--event-ns", type=int, default=0, help="verify: CLOCK_MONOTONIC ns of the disruption")
    args = p.parse_args()
    if args.size % UNIT or args.size < 64 * UNIT:
        sys.exit("chaos_writer: --size must be a multiple of 4096 and at least 256 KiB")
    if args.mode == "write":
        Writer(args).run()
        return 0
    return verify(args)


if __name__ == "__main__":
    sys.exit(main())
