#!/usr/bin/python3
"""Changes a share of an NBD export the way a guest does, for ops/bench-backup.

  backup_churn.py URI FRACTION SEED      # writes (60 %), write-zeroes (20 %) and trims (20 %)
  backup_churn.py --read-dirty URI BITMAP OUT
      virtnbdbackup's way of reading an incremental: the bitmap's dirty extents from
      qemu:dirty-bitmap:BITMAP (block status, as `nbdinfo --map` shows them), each read with
      libnbd and written at its offset into OUT (sparse). Prints "bytes seconds".
"""
import os
import random
import sys
import time

import nbd


def churn(uri, fraction, seed):
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    rng = random.Random(seed)
    budget = int(size * fraction)
    done = 0
    while done < budget:
        length = rng.choice([64 << 10, 256 << 10, 1 << 20])
        offset = rng.randrange(0, size - length) // 4096 * 4096
        kind = rng.random()
        if kind < 0.6:
            h.pwrite(rng.randbytes(length), offset)
        elif kind < 0.8:
            h.zero(length, offset)
        else:
            h.trim(length, offset)
        done += length
    h.flush()
    h.shutdown()
    print(done)


def read_dirty(uri, bitmap, out):
    context = "qemu:dirty-bitmap:" + bitmap
    h = nbd.NBD()
    h.add_meta_context(context)
    h.connect_uri(uri)
    if not h.can_meta_context(context):
        sys.exit(f"the server does not offer {context}")
    size = h.get_size()
    start = time.monotonic()
    extents = []
    offset = 0
    while offset < size:
        reached = [offset]

        def seen(name, at, entries, err):
            if name == context:
                for i in range(0, len(entries), 2):
                    if entries[i + 1] & 1:
                        extents.append((at, entries[i]))
                    at += entries[i]
                reached[0] = at
            return 0

        h.block_status(min(size - offset, 1 << 30), offset, seen)
        if reached[0] <= offset:
            sys.exit(f"block status for {context} at {offset} made no progress")
        offset = reached[0]
    total = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.ftruncate(fd, size)
    for at, length in extents:
        end = min(at + length, size)
        while at < end:
            n = min(end - at, 32 << 20)
            os.pwrite(fd, h.pread(n, at), at)
            total += n
            at += n
    os.close(fd)
    h.shutdown()
    print(total, round(time.monotonic() - start, 3))


if __name__ == "__main__":
    if sys.argv[1] == "--read-dirty":
        read_dirty(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        churn(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]))
