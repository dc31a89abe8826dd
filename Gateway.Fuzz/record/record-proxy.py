# Keeps the client->server bytes of every connection through it: python3 record-proxy.py LISTEN_PORT GATEWAY_PORT OUTDIR
import socket, sys, threading, os, itertools
listen, target, outdir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
os.makedirs(outdir, exist_ok=True)
counter = itertools.count()
def pump(src, dst, log):
    try:
        while True:
            b = src.recv(65536)
            if not b: break
            if log: log.write(b); log.flush()
            dst.sendall(b)
    except OSError: pass
    finally:
        try: dst.shutdown(socket.SHUT_WR)
        except OSError: pass
def serve(c):
    n = next(counter)
    s = socket.create_connection(("127.0.0.1", target))
    with open(os.path.join(outdir, "conn%03d.bin" % n), "wb") as log:
        t = threading.Thread(target=pump, args=(s, c, None)); t.start()
        pump(c, s, log); t.join()
    c.close(); s.close()
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("127.0.0.1", listen)); l.listen(16)
while True:
    c, _ = l.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
