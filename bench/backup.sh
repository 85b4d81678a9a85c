#!/usr/bin/env bash
# bench/backup.sh: backups and the cost of change tracking, in one boot of
# the ublk VM (make bench-backup runs it on each kernel line).
#
#   full         ublksnap backup of a 1 GiB filtered device full of random
#                data: seconds and bytes copied
#   incremental  after 1 % of the device's 4 KiB blocks were written at
#                random (fio randwrite, number_ios): seconds, bytes copied,
#                and the bytes of the tracking blocks those writes touched
#   restore      the chain (full + incremental), checked against the image
#   tracking     fio 4 KiB random writes, QD32, on a filtered device of the
#                daemon (tracked) and on `ublksnap dev serve` (the same
#                handler with no tracking map), alternating, BENCH_RUNS each
#
# Everything lives on the guest's tmpfs: run with --mem 6144.
set -euo pipefail
UBLKSNAP=${UBLKSNAP:-bin/ublksnap}
RUNS=${BENCH_RUNS:-3}
RUNTIME=${BENCH_RUNTIME:-6}
work=$(mktemp -d /tmp/ublksnap-bb.XXXXXX)
# The backing, a full backup and a restored image: 3 GiB and more.
mount -t tmpfs -o size=5G tmpfs "$work"
sock=$work/s.sock
u() { "$UBLKSNAP" --socket "$sock" "$@"; }
daemon=
serve=
cleanup() {
	set +e
	[ -n "$serve" ] && kill "$serve" && wait "$serve"
	[ -n "$daemon" ] && u shutdown --force >/dev/null && wait "$daemon"
	umount "$work"
	rm -rf "$work"
}
trap cleanup EXIT
"$UBLKSNAP" daemon --socket "$sock" 2>"$work/daemon.log" &
daemon=$!
for _ in $(seq 100); do u status >/dev/null 2>&1 && break; sleep 0.2; done

truncate -s 1G "$work/disk.img"
dev=$(u attach --backing "$work/disk.img")
dd if=/dev/urandom of="$dev" bs=1M count=1024 oflag=direct status=none
echo "kernel $(uname -r); 1 GiB device $dev"

u --json backup --device "$dev" --output "$work/full" | tail -n 1 | tee "$work/full.json"
# The change tracking point the full backup copied (its own take's).
since=$(u cbt info --device "$dev" | awk -F= '$1 == "generation" {g = $2} $1 == "changes_number" {n = $2} END {print g ":" n}')
blocks=$((1024 * 1024 / 4 / 100))
fio --name=one-percent --filename="$dev" --rw=randwrite --bs=4k --direct=1 --ioengine=libaio \
	--iodepth=16 --number_ios=$blocks --size=1G --randrepeat=0 --output-format=terse >/dev/null
u --json backup --device "$dev" --output "$work/inc" --since "$work/full/manifest.json" | tail -n 1 | tee "$work/inc.json"
# The read map stays as the incremental's take left it.
touched=$(u cbt changes --device "$dev" --since "$since" | awk '{n += $2} END {print n + 0}')
echo "{\"random_4k_writes\":$blocks,\"tracking_bytes_touched\":$touched}"
id=$(u snapshot create --device "$dev" --storage "$work" --limit 256MiB)
image=$(u snapshot take --id "$id" | awk '{print $2}')
u --json restore --manifest "$work/inc/manifest.json" --output "$work/restored.img" | tail -n 1
if [ "$(md5sum <"$image")" = "$(md5sum <"$work/restored.img")" ]; then same=true; else same=false; fi
echo "{\"restored_equals_image\":$same}"
rm -f "$work/restored.img"
u snapshot destroy --id "$id"
rm -rf "$work/full" "$work/inc"

# Tracking cost: the daemon's device (tracked) against dev serve (not).
truncate -s 256M "$work/plain.img"
"$UBLKSNAP" dev serve --backing "$work/plain.img" >"$work/serve.out" 2>&1 &
serve=$!
for _ in $(seq 100); do grep -q /dev/ublkb "$work/serve.out" 2>/dev/null && break; sleep 0.2; done
plain=$(grep -o '/dev/ublkb[0-9]*' "$work/serve.out" | head -n 1)
for d in "$dev" "$plain"; do dd if=/dev/zero of="$d" bs=1M count=256 oflag=direct status=none; done
for run in $(seq "$RUNS"); do
	for pair in "tracked:$dev" "untracked:$plain"; do
		iops=$(fio --name=w --filename="${pair#*:}" --rw=randwrite --bs=4k --direct=1 --ioengine=io_uring \
			--iodepth=32 --size=256M --time_based --runtime="$RUNTIME" --output-format=terse --terse-version=3 |
			awk -F';' '{print $49}')  # terse v3: field 49 is the write IOPS
		echo "{\"tracking\":\"${pair%%:*}\",\"run\":$run,\"iops\":$iops}"
	done
done
