namespace Gateway.Tests.Interop;

/// <summary>
/// For /usr/bin/python3 with the libnbd <c>nbd</c> module: three connections to one export,
/// given as NAME URI pairs (three connections to one gateway, or one through each node of a
/// cluster); writes, zeroes, flushes and reads rotate among them, and every read must see the
/// write or zero flushed through another connection (NBD_FLAG_CAN_MULTI_CONN).
/// </summary>
public static class MultiConn
{
    public const string Script = """
        import os, sys
        try:
            import nbd
        except ImportError:
            sys.exit("the python nbd module is missing: apt-get install python3-libnbd")

        names = sys.argv[1::2]
        conns = []
        for uri in sys.argv[2::2]:
            h = nbd.NBD()
            h.connect_uri(uri)
            conns.append(h)
        for name, h in zip(names, conns):
            if not h.can_multi_conn():
                sys.exit(f"the connection through {name} does not advertise NBD_FLAG_CAN_MULTI_CONN")
        size = conns[0].get_size()
        offsets = [0, 4096, 1 << 20, 3 * (1 << 20) + 512, 7 * (1 << 20) + 12345, size - 65536]
        for n, off in enumerate(offsets):
            # First round: write through the 2nd node, flush through the 3rd, read through the 1st;
            # then the roles rotate, so every node writes, flushes and reads for the others.
            w, f, r = (n + 1) % 3, (n + 2) % 3, n % 3
            length = min(65536 - (n * 1000), size - off)
            data = os.urandom(length)
            conns[w].pwrite(data, off)
            conns[f].flush()
            got = conns[r].pread(length, off)
            if got != data:
                sys.exit(f"offset {off}: read through {names[r]} differs from the write through {names[w]} (flushed through {names[f]})")
            # Zero on the reader, flush on the writer, read on the flusher: a stale copy would show.
            conns[r].zero(length, off)
            conns[w].flush()
            if conns[f].pread(length, off) != bytes(length):
                sys.exit(f"offset {off}: zero through {names[r]} not seen through {names[f]}")
            data = os.urandom(length)
            conns[f].pwrite(data, off)
            conns[r].flush()
            if conns[w].pread(length, off) != data:
                sys.exit(f"offset {off}: rewrite through {names[f]} not seen through {names[w]}")
        for h in conns:
            h.shutdown()
        print(f"ok: {len(offsets)} offsets consistent across {len(conns)} connections")
        """;
}
