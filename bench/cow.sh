#!/usr/bin/env bash
# bench/cow.sh OUTDIR: first writes under a snapshot, side by side in one
# boot of the ublk VM (make bench-cow runs it once per kernel line): how
# ublksnap saves a chunk, with an in-kernel copy (copy_file_range, the
# default where the original and the difference storage are regular
# files) or through a chunk buffer (chunk_copy_in_kernel=0, as blksnap),
# against dm-snapshot and dm-thin.
#
# Contenders, each over its own fresh, fully written tmpfs file of
# BENCH_SIZE MiB, with a snapshot taken afresh before every row:
#   copy      a filtered device of a ublksnap daemon, default parameters
#   buffers   the same in a second daemon run with --chunk-copy-in-kernel 0
#   dm-snap   dm snapshot-origin with a persistent (P) snapshot
#   dm-thin   a dm-thin volume and a thin snapshot of it
# Rows as in run.sh: first4k, firstlat4k, first1m; each BENCH_RUNS times,
# cycling through the contenders.
#
# Output in OUTDIR: raw.csv (row,contender,run,iops,mib_s,clat_p50_us) and
# cow.md (median [Q1–Q3] per cell, ratios of medians).
set -euo pipefail

UBLKSNAP=${UBLKSNAP:-bin/ublksnap}
OUT=${1:-${UBLKSNAP_VM_OUT:-}}
SIZE_MB=${BENCH_SIZE:-128}
RUNS=${BENCH_RUNS:-5}
CHUNK_SHIFT=${BENCH_CHUNK_SHIFT:-18}
chunk=$((1 << CHUNK_SHIFT))
chunk_sectors=$((chunk / 512))
sectors=$((SIZE_MB * 2048))
export DM_DISABLE_UDEV=1
# die, say, fill, loopdev, fiojob, fiorun, record, stats, dm_setup
. "$(dirname "$0")/lib.sh"
[ -n "$OUT" ] || die "usage: bench/cow.sh OUTDIR"
[ "$(id -u)" = 0 ] || die "needs root (run it in the VM: make bench-cow)"
[ -e /dev/ublk-control ] || die "no /dev/ublk-control: run it in the VM (make bench-cow)"
for t in fio jq losetup dmsetup; do command -v $t >/dev/null || die "$t is not installed"; done
[ -x "$UBLKSNAP" ] || die "$UBLKSNAP missing: make build"

work=$(mktemp -d /tmp/bench.XXXXXX)
mount -t tmpfs -o size=90% bench "$work" || die "cannot mount a tmpfs on $work"
pids=()
mkdir -p "$OUT"
raw=$OUT/raw.csv
echo "row,contender,run,iops,mib_s,clat_p50_us" >"$raw"
metric() { :; }
u() { local v=$1; shift; "$UBLKSNAP" --socket "$work/$v.sock" "$@"; }
cleanup() {
	set +e
	for v in copy buffers; do u "$v" shutdown --force 2>/dev/null; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
	for d in bench-thinsnap bench-thin bench-pool bench-snap bench-origin; do
		dmsetup remove "$d" 2>/dev/null
	done
	detach_loops
	umount "$work"
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

limit_mib=$((SIZE_MB + 64))
# ublksnap VARIANT DAEMON-ARGS...: a daemon and a filtered device over a
# fresh file; the device's path in dev_VARIANT.
ublksnap() {
	local v=$1
	shift
	"$UBLKSNAP" daemon --socket "$work/$v.sock" --chunk-minimum-shift "$CHUNK_SHIFT" \
		--diff-storage-minimum "${limit_mib}MiB" "$@" 2>"$work/$v.log" &
	pids+=($!)
	for _ in $(seq 100); do u "$v" status >/dev/null 2>&1 && break; sleep 0.2; done
	u "$v" status >/dev/null || die "the $v daemon did not start: $(cat "$work/$v.log")"
	fill "$work/$v.img"
	mkdir -p "$work/$v-diff"
	printf -v "dev_$v" %s "$(u "$v" attach --backing "$work/$v.img" --name "bench-$v")"
}
ublksnap copy
ublksnap buffers --chunk-copy-in-kernel 0
snap_copy= snap_buffers=
# fresh VARIANT: a freshly taken snapshot of that daemon's device.
fresh() {
	local v=$1 id var=snap_$1 dev=dev_$1
	[ -n "${!var}" ] && u "$v" snapshot destroy --id "${!var}" >/dev/null
	id=$(u "$v" snapshot create --device "${!dev}" --storage "$work/$v-diff" --limit "${limit_mib}MiB")
	u "$v" snapshot take --id "$id" >/dev/null
	printf -v "$var" %s "$id"
}
# copied VARIANT: "chunks copied, of which in the kernel" of its snapshot.
copied() { u "$1" --json status | jq -r '.snapshots[0].devices[0] | "\(.chunks_copied) chunks copied, \(.chunks_copied_in_kernel) in the kernel"'; }
dm_setup
say "kernel $(uname -r), ${SIZE_MB} MiB devices, chunk $chunk bytes"

rows="first4k firstlat4k first1m"
for r in $(seq 1 "$RUNS"); do
	for row in $rows; do
		fresh copy
		record "$row" copy "$r" "$dev_copy"
		[ "$r" = 1 ] && say "copy: $(copied copy)"
		fresh buffers
		record "$row" buffers "$r" "$dev_buffers"
		[ "$r" = 1 ] && say "buffers: $(copied buffers)"
		dm_fresh
		record "$row" dm-snap "$r" /dev/mapper/bench-origin
		dm_done
		thin_fresh
		record "$row" dm-thin "$r" /dev/mapper/bench-thin
		thin_done
	done
done

{
	echo "# First writes under a snapshot: kernel $(uname -r)"
	echo
	echo "One VM boot under qemu TCG, $(nproc) CPUs; each contender over its own tmpfs file of $SIZE_MB MiB,"
	echo "chunk (and dm chunk/block) $((chunk >> 10)) KiB, a snapshot taken afresh before each row; fio io_uring,"
	echo "direct=1, one job; median [Q1–Q3] of $RUNS interleaved runs. copy: ublksnap saving chunks with"
	echo "copy_file_range; buffers: through a chunk buffer (chunk_copy_in_kernel=0)."
	echo
	echo "| workload | unit | copy | buffers | dm-snap | dm-thin | copy / buffers | copy / dm-snap | copy / dm-thin | buffers / dm-snap |"
	echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
	for row in $rows; do
		unit=IOPS
		case $row in *1m) unit=MiB/s ;; firstlat4k) unit="µs p50" ;; esac
		for c in copy buffers dm-snap dm-thin; do stats "$raw" "$row" "$c"; done | paste -sd' ' |
			awk -v row="$row" -v unit="$unit" 'function r(a, b) { return b > 0 ? sprintf("%.2f", a / b) : "–" }
				{ printf "| %s | %s | %.0f [%.0f–%.0f] | %.0f [%.0f–%.0f] | %.0f [%.0f–%.0f] | %.0f [%.0f–%.0f] | %s | %s | %s | %s |\n",
					row, unit, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, r($1, $4), r($1, $7), r($1, $10), r($4, $7) }'
	done
} >"$OUT/cow.md"
cat "$OUT/cow.md" >&2
