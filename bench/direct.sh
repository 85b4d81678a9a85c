#!/usr/bin/env bash
# bench/direct.sh OUTDIR: ublksnap over a block device against that block
# device itself, side by side in one boot of the ublk VM (make bench-direct
# runs it once per kernel line). It measures what a user who attaches a
# disk gets, and that the disk's data is cached once: ublksnap reads and
# writes a block-device backing with O_DIRECT.
#
# Contenders, each over its own fresh, fully written tmpfs file of
# BENCH_SIZE MiB:
#   bdev        a loop device, read and written by fio directly
#   ublksnap    a filtered device of the ublksnap daemon over another loop
#               device, in no snapshot
# Rows as in run.sh (randw4k, write1m, randr4k, read1m, lat4k), each
# BENCH_RUNS times, cycling through the contenders. Beside them, how much
# the block devices' page cache (Buffers in /proc/meminfo) grew over all
# of ublksnap's runs: about nothing with O_DIRECT, the bytes touched
# without.
#
# Output in OUTDIR: raw.csv (row,contender,run,iops,mib_s,clat_p50_us) and
# direct.md (median [Q1–Q3] per cell, ratio of medians).
set -euo pipefail

UBLKSNAP=${UBLKSNAP:-bin/ublksnap}
OUT=${1:-${UBLKSNAP_VM_OUT:-}}
SIZE_MB=${BENCH_SIZE:-128}
RUNTIME=${BENCH_RUNTIME:-4}
RUNS=${BENCH_RUNS:-5}
chunk=$((256 << 10))
# die, say, fill, loopdev, fiojob, fiorun, record, stats
. "$(dirname "$0")/lib.sh"
[ -n "$OUT" ] || die "usage: bench/direct.sh OUTDIR"
[ "$(id -u)" = 0 ] || die "needs root (run it in the VM: make bench-direct)"
[ -e /dev/ublk-control ] || die "no /dev/ublk-control: run it in the VM (make bench-direct)"
for t in fio jq losetup; do command -v $t >/dev/null || die "$t is not installed"; done
[ -x "$UBLKSNAP" ] || die "$UBLKSNAP missing: make build"

work=$(mktemp -d /tmp/bench.XXXXXX)
mount -t tmpfs -o size=90% bench "$work" || die "cannot mount a tmpfs on $work"
sock=$work/ublksnap.sock
daemon_pid=
mkdir -p "$OUT"
raw=$OUT/raw.csv
echo "row,contender,run,iops,mib_s,clat_p50_us" >"$raw"
u() { "$UBLKSNAP" --socket "$sock" "$@"; }
cleanup() {
	set +e
	if [ -n "$daemon_pid" ]; then
		u shutdown --force
		wait "$daemon_pid" 2>/dev/null
	fi
	detach_loops
	umount "$work"
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fill "$work/bdev.img"
fill "$work/backing.img"
bdev=$(loopdev "$work/bdev.img")
backing=$(loopdev "$work/backing.img")
"$UBLKSNAP" daemon --socket "$sock" 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do u status >/dev/null 2>&1 && break; sleep 0.2; done
u status >/dev/null || die "the daemon did not start: $(cat "$work/daemon.log")"
dev=$(u attach --backing "$backing" --name bench)
mode=$(u --json status | jq -r '.devices[0] | "\(.io_mode) mode, direct_io \(.direct_io)"')
say "kernel $(uname -r): $dev over $backing, $mode"

buffers() { awk '/^Buffers:/ { print $2 }' /proc/meminfo; }
grown=0
rows="randw4k write1m randr4k read1m lat4k"
for r in $(seq 1 "$RUNS"); do
	for row in $rows; do
		record "$row" bdev "$r" "$bdev"
		before=$(buffers)
		record "$row" ublksnap "$r" "$dev"
		grown=$((grown + $(buffers) - before))
	done
done

# summary: one line per row, median [Q1–Q3] of each contender and the
# ratio of medians (latency: ublksnap / bdev, lower is better).
{
	echo "# ublksnap over a block device: kernel $(uname -r)"
	echo
	echo "One VM boot under qemu TCG, $(nproc) CPUs; each contender over a loop device over its own"
	echo "tmpfs file of $SIZE_MB MiB; fio io_uring, direct=1, one job; median [Q1–Q3] of $RUNS"
	echo "interleaved runs, time-based rows $RUNTIME s. ublksnap: $mode."
	echo "The block devices' page cache grew by $((grown / 1024)) MiB over all of ublksnap's runs."
	echo
	echo "| workload | unit | bdev | ublksnap over bdev | ublksnap / bdev |"
	echo "|---|---|---:|---:|---:|"
	for row in $rows; do
		unit=IOPS
		case $row in *1m) unit=MiB/s ;; lat4k) unit="µs p50" ;; esac
		for c in bdev ublksnap; do stats "$raw" "$row" "$c"; done | paste -sd' ' | awk -v row="$row" -v unit="$unit" \
			'{ printf "| %s | %s | %.0f [%.0f–%.0f] | %.0f [%.0f–%.0f] | %.2f |\n", row, unit, $1, $2, $3, $4, $5, $6, ($1 > 0 ? $4 / $1 : 0) }'
	done
} >"$OUT/direct.md"
cat "$OUT/direct.md" >&2
