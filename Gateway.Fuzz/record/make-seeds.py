# python3 make-seeds.py RECORDED_DIR CORPUS_DIR (RECORDED_DIR/<client>/connNNN.bin from record-proxy.py)
# Splits recorded client->server streams into seeds: the whole connection for the handshake
# harness, the transmission part (with a mode byte in front) for the transmission harness.
# Sessions are cut at a request boundary once the transmission part passes CAP bytes.
import struct, sys, os, glob
src, dst = sys.argv[1], sys.argv[2]
CAP = 4200
for hd in ("handshake", "transmission"):
    os.makedirs(os.path.join(dst, hd), exist_ok=True)
for path in sorted(glob.glob(os.path.join(src, "*", "conn*.bin"))):
    name = os.path.basename(os.path.dirname(path)) + ("" if path.endswith("conn000.bin") else "-" + os.path.basename(path)[4:7])
    data = open(path, "rb").read()
    if len(data) < 4: continue
    at, structured, context, export, attached = 4, False, False, None, False
    while at + 16 <= len(data):
        magic, opt, length = struct.unpack(">QII", data[at:at+16])
        body = data[at+16:at+16+length]; at += 16 + length
        if opt == 8: structured = True
        if opt == 10: context = True
        if opt == 1: export, attached = body.decode(), True; break
        if opt == 7:
            n = struct.unpack(">I", body[:4])[0]; export, attached = body[4:4+n].decode(), True; break
    end = at
    if attached:
        while end + 28 <= len(data) and end - at < CAP:
            _, _, typ, _, _, length = struct.unpack(">IHHQQI", data[end:end+28])
            end += 28 + (length if typ == 1 else 0)
        end = min(end, len(data))
    else:
        end = len(data)
    open(os.path.join(dst, "handshake", name), "wb").write(data[:end])
    if attached and end > at:
        mode = (1 if structured else 0) | (2 if context else 0) | (4 if export == "ro" else 0)
        open(os.path.join(dst, "transmission", name), "wb").write(bytes([mode]) + data[at:end])
        # The same requests arriving in small reads, and served on the thread pool.
        open(os.path.join(dst, "transmission", name + "-split"), "wb").write(bytes([mode | 8 | (5 << 4)]) + data[at:end])
    print(name, len(data), "->", end, "attached" if attached else "", export or "")
