#!/usr/bin/env python3
"""Seeds for the qcow2 harness (Gateway.Fuzz/Qcow2Harness.cs), made with the real qemu-img and qemu-io.

    make-qcow2-seeds.py OUTDIR

Each seed is a chain made in a scratch folder as files named 0 (the image opened), 1, 2 (its
backing or data files, named so by the images), encoded as the harness reads them: per file
"QFZF" length:u32 count:u16, then chunks offset:u32 size:u16 bytes, holes left out.
"""
import os
import struct
import subprocess
import sys
import tempfile

MAX_CHUNK = 0xFFFF


def run(folder, *args):
    subprocess.run(args, cwd=folder, check=True, stdout=subprocess.DEVNULL)


def img(folder, *args):
    run(folder, "qemu-img", *args)


def io(folder, image, *commands, fmt=None):
    args = ["qemu-io"] + (["-f", fmt] if fmt else [])
    for c in commands:
        args += ["-c", c]
    run(folder, *args, image)


def encode_file(path):
    data = open(path, "rb").read()
    chunks = []
    i = 0
    # Non-zero 16-byte blocks, merged when the gap between them is under 64 bytes.
    while i < len(data):
        if not any(data[i:i + 16]):
            i += 16
            continue
        start = i
        end = i + 16
        while end < len(data) and end - start < MAX_CHUNK - 80:
            window = data[end:end + 64]
            if not any(window):
                break
            end += 16
        end = min(end, len(data))
        chunks.append((start, data[start:end]))
        i = end
    out = b"QFZF" + struct.pack(">IH", len(data), len(chunks))
    for offset, piece in chunks:
        out += struct.pack(">IH", offset, len(piece)) + piece
    return out


def seed(outdir, name, build):
    with tempfile.TemporaryDirectory() as folder:
        build(folder)
        encoded = b""
        for i in range(8):
            path = os.path.join(folder, str(i))
            if not os.path.exists(path):
                break
            encoded += encode_file(path)
    with open(os.path.join(outdir, name), "wb") as f:
        f.write(encoded)
    print(f"{name}: {len(encoded)} bytes")


def plain(cluster, *extra, version="1.1", size="4M", writes=("write -P 0x5a 0 4k", "write -P 0xa5 1M 6k", "write -z 2M 4k")):
    def build(folder):
        img(folder, "create", "-f", "qcow2", "-o", f"cluster_size={cluster},compat={version}" + "".join("," + e for e in extra), "0", size)
        io(folder, "0", *writes)
    return build


def compressed(cluster, compression):
    def build(folder):
        img(folder, "create", "-f", "raw", "r", "1M")
        io(folder, "r", "write -P 0x11 0 64k", "write -P 0x22 200k 8k", fmt="raw")
        opts = f"cluster_size={cluster}" + (f",compression_type={compression}" if compression else "")
        img(folder, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, "r", "0")
        os.remove(os.path.join(folder, "r"))
    return build


def chain(folder):
    img(folder, "create", "-f", "raw", "2", "1M")
    io(folder, "2", "write -P 0x11 0 8k", fmt="raw")
    img(folder, "create", "-f", "qcow2", "-o", "cluster_size=4k", "-b", "2", "-F", "raw", "1", "2M")
    io(folder, "1", "write -P 0x22 4k 4k", "write -z 8k 4k")
    img(folder, "create", "-f", "qcow2", "-o", "cluster_size=64k,extended_l2=on", "-b", "1", "-F", "qcow2", "0", "2M")
    io(folder, "0", "write -P 0x33 2k 2k", "discard 64k 64k")


def chain_probed(folder):
    # No backing format named: the reader probes the backing file's header.
    img(folder, "create", "-f", "raw", "1", "512k")
    io(folder, "1", "write -P 0x44 0 4k", fmt="raw")
    img(folder, "create", "-f", "qcow2", "-o", "cluster_size=512,compat=0.10", "-b", "1", "-F", "raw", "0", "1M")
    io(folder, "0", "write -P 0x55 512 1k")
    # qemu-img insists on -F: end the header extensions before the backing-format one (v2: at 72).
    with open(os.path.join(folder, "0"), "r+b") as f:
        f.seek(72)
        assert f.read(4) == bytes.fromhex("e2792aca")
        f.seek(72)
        f.write(bytes(4))


def data_file(folder):
    img(folder, "create", "-f", "qcow2", "-o", "cluster_size=4k,data_file=1,data_file_raw=on", "0", "1M")
    io(folder, "0", "write -P 0x66 4k 8k", "write -z 64k 4k")


def main():
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    seed(outdir, "v3-64k", plain("64k"))
    seed(outdir, "v2-64k", plain("64k", version="0.10"))
    seed(outdir, "v3-512", plain("512", size="256k", writes=("write -P 0x5a 0 1k", "write -z 4k 1k", "write -P 0x77 100k 512")))
    seed(outdir, "v3-4k-zero", plain("4k", writes=("write -P 0x5a 0 8k", "write -z 8k 8k", "discard 0 4k", "write -z -u 1M 4k")))
    seed(outdir, "v3-2m", plain("2M", size="8M", writes=("write -P 0x5a 0 4k", "write -z 2M 2M", "write -P 0x3c 6M 512")))
    seed(outdir, "v3-ext-l2-64k", plain("64k", "extended_l2=on", writes=("write -P 0x5a 0 2k", "write -z 4k 2k", "write -P 0x3c 70k 2k")))
    seed(outdir, "v3-ext-l2-2m", plain("2M", "extended_l2=on", size="4M", writes=("write -P 0x5a 64k 4k", "write -z 128k 64k")))
    seed(outdir, "deflate-4k", compressed("4k", None))
    seed(outdir, "deflate-64k", compressed("64k", None))
    seed(outdir, "zstd-64k", compressed("64k", "zstd"))
    seed(outdir, "chain-raw-qcow2-extl2", chain)
    seed(outdir, "chain-probed-v2-512", chain_probed)
    seed(outdir, "data-file", data_file)


if __name__ == "__main__":
    main()
