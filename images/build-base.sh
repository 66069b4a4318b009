#!/usr/bin/env bash
# Build images/out/base.qcow2: a Debian bookworm (minbase) root filesystem with
# the cloud kernel, in a fixed-size ext4 filesystem, converted to qcow2.
#
# Also copies the kernel's bzImage to images/out/vmlinuz (see extract-vmlinux.py
# for the uncompressed ELF images/out/vmlinux).
#
# Caching (everything under images/cache/, gitignored):
#   cache/debs/        .deb files downloaded by debootstrap (--cache-dir)
#   cache/rootfs/      the debootstrapped tree, reused while the "rootfs key"
#                      (mirror, suite, variant, packages, ROOTFS_RECIPE) is unchanged
#   out/base.qcow2.key the "image key"; when it matches and the outputs exist,
#                      the script exits at once.
#
# Determinism (cheap measures): SOURCE_DATE_EPOCH for every timestamp in the
# filesystem (mtimes clamped in the tree, atime/ctime set with debugfs,
# superblock times via E2FSPROGS_FAKE_TIME), fixed filesystem UUID and
# directory hash seed, logs/caches/machine-id cleared. Two builds from the same
# debootstrapped tree give byte-identical images.
#
# Must run as root. Environment overrides: SUITE, IMAGE_SIZE, MIRROR,
# SOURCE_DATE_EPOCH, FS_UUID.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${HERE}/cache"
OUT="${HERE}/out"
ROOTFS="${CACHE}/rootfs"
IMAGE="${OUT}/base.qcow2"

SUITE="${SUITE:-bookworm}"
VARIANT="minbase"
INCLUDE="linux-image-cloud-amd64"
IMAGE_SIZE="${IMAGE_SIZE:-1G}"
# 2025-05-20 00:00:00 UTC, the date of the Debian snapshot this machine uses.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-1747699200}"
FS_UUID="${FS_UUID:-5e1f0b2a-7c3d-4e5f-8a9b-0c1d2e3f4a5b}"

log() { printf 'build-base: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (debootstrap, chroot)"

# --- mirror: read from this machine's apt configuration ----------------------
# Takes the first URI serving the main suite (not -security/-updates), from the
# deb822 .sources files or the one-line sources.list format.
find_mirror() {
    local f
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            function flush() {
                if (uris != "" && (" " suites " ") ~ (" " suite " ") && types ~ /(^| )deb( |$)/) {
                    split(uris, u, " "); print u[1]; found = 1; exit
                }
                uris = ""; suites = ""; types = ""
            }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]*#/ { next }
            tolower($1) == "uris:"   { $1 = ""; uris = $0; sub(/^ +/, "", uris) }
            tolower($1) == "suites:" { $1 = ""; suites = $0; sub(/^ +/, "", suites) }
            tolower($1) == "types:"  { $1 = ""; types = $0; sub(/^ +/, "", types) }
            END { if (!found) flush() }
        ' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        awk -v suite="$SUITE" '
            $1 == "deb" {
                i = 2; if ($i ~ /^\[/) { while ($i !~ /\]$/) i++; i++ }
                if ($(i + 1) == suite) { print $i; exit }
            }' "$f"
    done
}
if [ -z "${MIRROR:-}" ]; then
    MIRROR="$(find_mirror | head -n1)"
fi
[ -n "$MIRROR" ] || die "no apt source for suite '$SUITE' found in /etc/apt/sources.list*"

# --- tools --------------------------------------------------------------------
need_tools() {
    local missing=()
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
    command -v qemu-img >/dev/null || missing+=(qemu-utils)
    command -v lz4 >/dev/null || missing+=(lz4)
    if [ "${#missing[@]}" -gt 0 ]; then
        log "installing ${missing[*]}"
        apt-get update
        DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    fi
}
need_tools

# --- cache keys ---------------------------------------------------------------
# Bump ROOTFS_RECIPE when the stage-1 commands below change meaningfully.
ROOTFS_RECIPE=1
SCRIPT_SUM="$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
ROOTFS_KEY="$(printf '%s\n' "$ROOTFS_RECIPE" "$MIRROR" "$SUITE" "$VARIANT" "$INCLUDE" "$SOURCE_DATE_EPOCH" \
    | sha256sum | cut -d' ' -f1)"
IMAGE_KEY="$(printf '%s\n' "$ROOTFS_KEY" "$SCRIPT_SUM" "$IMAGE_SIZE" "$FS_UUID" | sha256sum | cut -d' ' -f1)"

if [ -f "$IMAGE" ] && [ -f "${OUT}/vmlinuz" ] && [ "$(cat "${IMAGE}.key" 2>/dev/null)" = "$IMAGE_KEY" ]; then
    log "up to date: ${IMAGE} (key ${IMAGE_KEY:0:12})"
    exit 0
fi

mkdir -p "${CACHE}/debs" "$OUT"

# Unmount anything debootstrap/chroot may have left mounted below $ROOTFS.
unmount_rootfs() {
    local m
    for m in $(awk -v r="$ROOTFS" '$2 == r || index($2, r "/") == 1 { print $2 }' /proc/mounts | sort -r); do
        umount -l "$m" || true
    done
}
trap unmount_rootfs EXIT

# --- stage 1: the root filesystem tree ----------------------------------------
if [ "$(cat "${CACHE}/rootfs.key" 2>/dev/null)" != "$ROOTFS_KEY" ] || [ ! -d "$ROOTFS" ]; then
    log "debootstrap $VARIANT $SUITE from $MIRROR (+ $INCLUDE)"
    unmount_rootfs
    rm -rf --one-file-system "$ROOTFS" "${CACHE}/rootfs.key"
    mkdir -p "$ROOTFS"
    debootstrap --variant="$VARIANT" --include="$INCLUDE" --merged-usr \
        --cache-dir="${CACHE}/debs" "$SUITE" "$ROOTFS" "$MIRROR" >"${CACHE}/debootstrap.log" 2>&1 \
        || { tail -n 30 "${CACHE}/debootstrap.log" >&2; die "debootstrap failed (log: ${CACHE}/debootstrap.log)"; }
    unmount_rootfs

    # Minimal configuration so the image is usable as a VM root disk.
    echo "shrink" >"${ROOTFS}/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tshrink\n' >"${ROOTFS}/etc/hosts"
    printf '/dev/vda\t/\text4\terrors=remount-ro\t0\t1\n' >"${ROOTFS}/etc/fstab"
    printf 'deb %s %s main\n' "$MIRROR" "$SUITE" >"${ROOTFS}/etc/apt/sources.list"
    # Root without password (test image only).
    chroot "$ROOTFS" passwd -d root >/dev/null

    # Strip non-deterministic state.
    rm -rf "${ROOTFS}"/var/cache/apt/*.bin "${ROOTFS}"/var/cache/apt/archives/*.deb \
        "${ROOTFS}"/var/lib/apt/lists/* "${ROOTFS}"/var/log/* "${ROOTFS}"/tmp/* \
        "${ROOTFS}"/var/cache/ldconfig/aux-cache "${ROOTFS}"/debootstrap
    : >"${ROOTFS}/etc/machine-id"
    # The debootstrap log is kept in the cache, not in the image.
    echo "$ROOTFS_KEY" >"${CACHE}/rootfs.key"
fi

# Clamp modification times to SOURCE_DATE_EPOCH (cheap, also on reuse).
find "$ROOTFS" -xdev -newermt "@${SOURCE_DATE_EPOCH}" -exec touch -h -d "@${SOURCE_DATE_EPOCH}" {} + 2>/dev/null || true

# --- stage 2: ext4 image -> qcow2 ---------------------------------------------
RAW="${CACHE}/base.raw"
rm -f "$RAW" "$IMAGE" "${IMAGE}.key"
log "mkfs.ext4 -d ($IMAGE_SIZE)"
# E2FSPROGS_FAKE_TIME fixes the superblock/inode times mke2fs itself writes.
E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH" mkfs.ext4 -q -F -L shrink-root -U "$FS_UUID" \
    -E "hash_seed=${FS_UUID},root_owner=0:0" -I 256 -d "$ROOTFS" "$RAW" "$IMAGE_SIZE" 2>&1 \
    | grep -v '^Creating regular file' >&2 || true
# mke2fs -d copies atime and ctime from the tree, which no one can set (ctime)
# or which change whenever a file is read (atime): set both to
# SOURCE_DATE_EPOCH in the filesystem itself, one debugfs pass (~1 s).
(cd "$ROOTFS" && find . -xdev -mindepth 1 -printf '%P\0') | SDE="$SOURCE_DATE_EPOCH" python3 -c '
import os, sys
e = os.environ["SDE"]
print(f"sif / atime @{e}\nsif / ctime @{e}")
for p in sys.stdin.buffer.read().decode("utf-8", "surrogateescape").split("\0"):
    if p:
        q = "\"/" + p.replace("\\", "\\\\").replace("\"", "\\\"") + "\""
        print(f"sif {q} atime @{e}\nsif {q} ctime @{e}")
' >"${CACHE}/debugfs-times.cmd"
E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH" debugfs -w -f "${CACHE}/debugfs-times.cmd" "$RAW" >"${CACHE}/debugfs-times.log" 2>&1
if grep -v '^debugfs' "${CACHE}/debugfs-times.log" | grep -q .; then
    grep -v '^debugfs' "${CACHE}/debugfs-times.log" | head -n 5 >&2
    die "debugfs could not set some timestamps (log: ${CACHE}/debugfs-times.log)"
fi
E2FSPROGS_FAKE_TIME="$SOURCE_DATE_EPOCH" e2fsck -fn "$RAW" >"${CACHE}/e2fsck.log" 2>&1 \
    || { cat "${CACHE}/e2fsck.log" >&2; die "e2fsck found errors in the new filesystem"; }
log "qemu-img convert -> $IMAGE"
qemu-img convert -f raw -O qcow2 "$RAW" "${IMAGE}.tmp"
rm -f "$RAW"
mv "${IMAGE}.tmp" "$IMAGE"

# --- kernel -------------------------------------------------------------------
VMLINUZ="$(ls "${ROOTFS}"/boot/vmlinuz-* | sort -V | tail -n1)"
[ -f "$VMLINUZ" ] || die "no /boot/vmlinuz-* in the rootfs"
# Copy only on change, so that make does not redo out/vmlinux needlessly.
cmp -s "$VMLINUZ" "${OUT}/vmlinuz" || { cp "$VMLINUZ" "${OUT}/vmlinuz.tmp" && mv "${OUT}/vmlinuz.tmp" "${OUT}/vmlinuz"; }
basename "$VMLINUZ" | sed 's/^vmlinuz-//' >"${OUT}/vmlinuz.release"
INITRD="${ROOTFS}/boot/initrd.img-$(cat "${OUT}/vmlinuz.release")"
if [ -f "$INITRD" ]; then
    cmp -s "$INITRD" "${OUT}/initrd.img" || cp "$INITRD" "${OUT}/initrd.img"
fi

echo "$IMAGE_KEY" >"${IMAGE}.key"
log "done: $(du -h --apparent-size "$IMAGE" | cut -f1) ${IMAGE}, kernel $(cat "${OUT}/vmlinuz.release")"
