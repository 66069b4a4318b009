#!/usr/bin/env python3
"""Extract the uncompressed ELF kernel (vmlinux) from an x86 bzImage.

The compressed payload is located through the setup header (Documentation/
arch/x86/boot.rst): the protected-mode code starts at (setup_sects + 1) * 512
(setup_sects at 0x1f1, 0 meaning 4), and payload_offset (u32 at 0x248) /
payload_length (u32 at 0x24c) are relative to it. The compressor is detected
by magic and run as an external tool. The kernel build appends the
uncompressed size (u32 LE) to the lz4/xz/zstd/lzma/lzo/bzip2 payloads (gzip
has it as its own trailer), so those 4 bytes are stripped before
decompression and used to check the result.

Usage: extract-vmlinux.py BZIMAGE OUTPUT
"""

import os
import struct
import subprocess
import sys

# (name, magic, command, trailing size appended by the kernel build)
FORMATS = [
    ("gzip", b"\x1f\x8b", ["gzip", "-dc"], False),
    ("xz", b"\xfd7zXZ\x00", ["xz", "-dc", "--single-stream"], True),
    ("zstd", b"\x28\xb5\x2f\xfd", ["zstd", "-dc"], True),
    ("lz4", b"\x02\x21\x4c\x18", ["lz4", "-dc"], True),
    ("bzip2", b"BZh", ["bzip2", "-dc"], True),
    ("lzma", b"\x5d\x00\x00", ["xz", "-dc", "--format=lzma"], True),
    ("lzo", b"\x89\x4c\x5a\x4f", ["lzop", "-dc"], True),
]


def die(msg):
    print(f"extract-vmlinux: error: {msg}", file=sys.stderr)
    sys.exit(1)


def payload(image):
    if len(image) < 0x250 or image[0x202:0x206] != b"HdrS":
        die("not a bzImage (no 'HdrS' setup header signature)")
    version = struct.unpack_from("<H", image, 0x206)[0]
    if version < 0x208:
        die(f"boot protocol {version:#x} has no payload_offset (needs >= 2.08)")
    setup_sects = image[0x1F1] or 4
    pm_start = (setup_sects + 1) * 512
    offset, length = struct.unpack_from("<II", image, 0x248)
    start = pm_start + offset
    if length == 0 or start + length > len(image):
        die(f"payload {start:#x}+{length:#x} outside the {len(image):#x}-byte image")
    return start, image[start : start + length]


def main():
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, "rb") as f:
        image = f.read()
    start, data = payload(image)

    for name, magic, cmd, size_appended in FORMATS:
        if data.startswith(magic):
            break
    else:
        die(f"unknown compression (payload starts with {data[:8].hex()})")

    expected = struct.unpack_from("<I", data, len(data) - 4)[0]
    stream = data[:-4] if size_appended else data
    try:
        out = subprocess.run(cmd, input=stream, stdout=subprocess.PIPE, stderr=subprocess.PIPE, check=False)
    except FileNotFoundError:
        die(f"{cmd[0]} not found (apt-get install {cmd[0]})")
    vmlinux = out.stdout
    if out.returncode != 0 and not vmlinux.startswith(b"\x7fELF"):
        die(f"{' '.join(cmd)} failed: {out.stderr.decode(errors='replace').strip()}")
    if not vmlinux.startswith(b"\x7fELF"):
        die("decompressed payload is not an ELF file")
    if len(vmlinux) != expected:
        die(f"decompressed size {len(vmlinux)} != {expected} recorded in the payload")

    tmp = dst + ".tmp"
    with open(tmp, "wb") as f:
        f.write(vmlinux)
    check = subprocess.run(["readelf", "-h", tmp], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check.returncode != 0 or "EXEC" not in check.stdout:
        os.unlink(tmp)
        die(f"readelf -h does not accept the result: {check.stderr.strip()}")
    os.replace(tmp, dst)
    print(f"extract-vmlinux: {name} payload at {start:#x} ({len(data)} bytes) -> {dst} ({len(vmlinux)} bytes, ELF EXEC)")


if __name__ == "__main__":
    main()
