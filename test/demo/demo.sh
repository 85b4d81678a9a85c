#!/usr/bin/env bash
# test/demo/demo.sh: the ublksnap demo. Needs root and a kernel with ublk_drv
# (test/demo/run boots one in qemu when the host has none).
#
# It attaches a file as a filtered device, puts ext4 with some files on it,
# takes a snapshot while a writer keeps changing those files, mounts the
# snapshot image and checks that it shows the files as they were at the
# take, prints `ublksnap status`, makes a full and an incremental backup,
# restores them and checks them against the snapshot image, copies the image
# over NBD with nbdcopy, and cleans up.
set -euo pipefail

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
bin=${UBLKSNAP_BIN:-$top/bin/ublksnap}
work=$(mktemp -d /tmp/ublksnap-demo.XXXXXX)
sock=$work/ublksnap.sock
u() { "$bin" --socket "$sock" "$@"; }
say() { printf '\n==> %s\n' "$*"; }
trap 'echo "demo: failed at line $LINENO: $BASH_COMMAND (exit $?); daemon log:" >&2; tail -n 20 "$work/daemon.log" >&2' ERR

daemon_pid=
writer_pid=
cleanup() {
	set +e
	[ -n "$writer_pid" ] && kill "$writer_pid" 2>/dev/null && wait "$writer_pid" 2>/dev/null
	umount "$work/image" "$work/fs" 2>/dev/null
	if [ -n "$daemon_pid" ]; then
		u shutdown --force && wait "$daemon_pid"
	fi
	rm -rf "$work"
}
trap cleanup EXIT

say "kernel $(uname -r) has ublk: $(ls /dev/ublk-control)"
say "starting the ublksnap daemon (log: $work/daemon.log)"
"$bin" daemon --socket "$sock" --diff-storage-minimum 32MiB 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do u status >/dev/null 2>&1 && break; sleep 0.2; done

say "attaching a 256 MiB backing file as a filtered device"
truncate -s 256M "$work/disk.img"
dev=$(u attach --backing "$work/disk.img" --name demo)
echo "filtered device: $dev"

say "making ext4 on $dev and writing 100 files with their md5 list"
mkfs.ext4 -q "$dev"
mkdir -p "$work/fs" "$work/image"
mount "$dev" "$work/fs"
for i in $(seq 1 100); do
	head -c $((4096 * (1 + i % 17))) /dev/urandom >"$work/fs/file$i"
done
(cd "$work/fs" && md5sum file* >MD5SUMS)
sync

say "starting a writer: it creates file new1, new2, ... and records the count"
(
	n=0
	while :; do
		n=$((n + 1))
		head -c 16384 /dev/urandom >"$work/fs/new$n"
		echo "$n" >"$work/fs/counter"
	done
) &
writer_pid=$!
sleep 1

say "creating and taking a snapshot while the writer runs"
id=$(u snapshot create --device "$dev" --storage "$work" --limit 256MiB)
echo "snapshot $id (difference storage: an unnamed file in $work)"
u snapshot take --id "$id" | while read -r orig image; do echo "image of $orig: $image"; done
image=$(u snapshot info --device "$dev" | sed -n 's/^image=//p')

say "after the take, overwriting 50 of the listed files on the original"
for i in $(seq 1 2 100); do head -c 8192 /dev/urandom >"$work/fs/file$i"; done
kill "$writer_pid"
wait "$writer_pid" 2>/dev/null || true
writer_pid=
sync
changed=$( (cd "$work/fs" && md5sum --quiet -c MD5SUMS 2>/dev/null || true) | grep -c FAILED || true)
echo "on the original, $changed of the 100 listed files no longer match the list; the writer made $(cat "$work/fs/counter") new files"

say "checking the image $image: fsck, mount read-only, every file against MD5SUMS"
fsck.ext4 -fn "$image" >/dev/null
echo "fsck.ext4 -fn: clean"
mount -o ro,noload "$image" "$work/image"
(cd "$work/image" && md5sum --quiet -c MD5SUMS)
echo "all 100 listed files in the image match the list made before the take"
k=$(cat "$work/image/counter")
for i in $(seq 1 "$k"); do
	[ -e "$work/image/new$i" ] || { echo "demo: the image has counter $k but no new$i" >&2; exit 1; }
done
if [ -e "$work/image/new$((k + 2))" ]; then
	echo "demo: the image has new$((k + 2)), written after counter $k" >&2
	exit 1
fi
echo "the image holds the writer's first $k new files and its counter says $k: one instant, consistent"

say "ublksnap status"
u status

say "a full backup of the snapshot held now, restored and checked against the image"
umount "$work/image"
u backup --device "$dev" --output "$work/backup/full"
u restore --manifest "$work/backup/full/manifest.json" --output "$work/restored-full.img"
[ "$(md5sum <"$image")" = "$(md5sum <"$work/restored-full.img")" ]
echo "restored image = snapshot image (md5 $(md5sum <"$image" | cut -c1-12)...)"

say "the same image over NBD, for the backup tools people already run: ublksnap export, then nbdcopy"
u export --id "$id" --listen "unix:$work/nbd.sock" | tee "$work/export.txt"
uri=$(sed -n 's/.* uri=\([^ ]*\).*/\1/p' "$work/export.txt")
if command -v nbdcopy >/dev/null; then
	nbdcopy "$uri" "$work/nbd.img"
	[ "$(md5sum <"$image")" = "$(md5sum <"$work/nbd.img")" ]
	echo "nbdcopy of $uri = snapshot image"
	rm -f "$work/nbd.img"
else
	echo "(nbdcopy is not installed here: apt-get install libnbd-bin to try it)"
fi
u snapshot destroy --id "$id"

say "30 more files on the original; change tracking since the full backup"
for i in $(seq 1 30); do head -c 65536 /dev/urandom >"$work/fs/later$i"; done
sync
u cbt info --device "$dev"

say "an incremental backup: it takes its own snapshot, copies only the changed blocks, destroys the snapshot"
u backup --device "$dev" --output "$work/backup/inc1" --since "$work/backup/full/manifest.json"
echo "disk used: full $(du -sh "$work/backup/full" | cut -f1), incremental $(du -sh "$work/backup/inc1" | cut -f1)"

say "restoring the chain (full + incremental): a clean ext4 with the later files"
u restore --manifest "$work/backup/inc1/manifest.json" --output "$work/restored-inc.img"
fsck.ext4 -fn "$work/restored-inc.img" >/dev/null
mount -o ro,loop,noload "$work/restored-inc.img" "$work/image"
[ -e "$work/image/later30" ]
umount "$work/image"
echo "the restored chain is a clean ext4 with the files written after the full backup"

say "cleaning up: unmount, detach, stop the daemon"
umount "$work/fs"
u detach --device "$dev"
u shutdown && wait "$daemon_pid"
daemon_pid=
say "demo finished: the snapshot showed a consistent point in time while the device kept changing, and its backups restored to the same bytes"
