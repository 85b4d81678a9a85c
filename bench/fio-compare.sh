#!/bin/sh
# fio-compare.sh [OUTDIR]: fio on the kernel loop device against the ublk
# pass-through device (ublksnap dev serve), both over a tmpfs backing file of
# the same size, inside one boot of the ublk VM (make bench runs it through
# test/vm/run). Rows: 4 KiB randread and randwrite at QD32, 1 MiB sequential
# read and write at QD8; io_uring engine, direct I/O, time based.
#
# It prints IOPS, bandwidth and the ratio ublk/loop per row and, when OUTDIR
# (or $UBLKSNAP_VM_OUT) is set, writes OUTDIR/fio-compare.txt.
#
# Environment: UBLKSNAP (binary, default bin/ublksnap), BENCH_SIZE (default
# 512M), BENCH_RUNTIME (seconds per row, default 10), BENCH_QUEUES (ublk
# queues, default 2), BENCH_DEPTH (ublk queue depth, default 128),
# BENCH_SERVE_ARGS (extra "dev serve" flags).
set -eu

UBLKSNAP=${UBLKSNAP:-bin/ublksnap}
OUT=${1:-${UBLKSNAP_VM_OUT:-}}
SIZE=${BENCH_SIZE:-512M}
RUNTIME=${BENCH_RUNTIME:-10}
QUEUES=${BENCH_QUEUES:-2}
DEPTH=${BENCH_DEPTH:-128}

die() { echo "fio-compare: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (run it in the VM: make bench)"
[ -e /dev/ublk-control ] || die "no /dev/ublk-control: run it in the VM (make bench)"
command -v fio >/dev/null || die "fio is not installed"
[ -x "$UBLKSNAP" ] || die "$UBLKSNAP missing: make build"
"$UBLKSNAP" dev serve --help >/dev/null 2>&1 || die "$UBLKSNAP has no 'dev serve' command"

work=$(mktemp -d /tmp/fio-compare.XXXXXX)
loopdev=
server=
cleanup() {
	[ -n "$server" ] && kill -TERM "$server" 2>/dev/null && wait "$server" 2>/dev/null
	[ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT INT TERM

# Same size, both fully written so that no row reads holes.
for f in loop ublk; do
	truncate -s "$SIZE" "$work/$f.img"
	fio --name=fill --filename="$work/$f.img" --rw=write --bs=1M --size="$SIZE" \
		--ioengine=psync --output-format=terse >/dev/null || die "filling $f.img failed"
done

loopdev=$(losetup --find --show --direct-io=on "$work/loop.img" 2>/dev/null) ||
	loopdev=$(losetup --find --show "$work/loop.img") || die "losetup failed"
loopdio=$(cat "/sys/block/${loopdev#/dev/}/loop/dio" 2>/dev/null || echo "?")

"$UBLKSNAP" dev serve --backing "$work/ublk.img" --queues "$QUEUES" --depth "$DEPTH" \
	${BENCH_SERVE_ARGS:-} >"$work/ublk.path" 2>"$work/ublk.log" &
server=$!
i=0
while [ ! -s "$work/ublk.path" ]; do
	i=$((i + 1))
	[ $i -gt 300 ] && die "ublk device did not come up: $(cat "$work/ublk.log")"
	kill -0 "$server" 2>/dev/null || die "dev serve exited: $(cat "$work/ublk.log")"
	sleep 0.1
done
ublkdev=$(cat "$work/ublk.path")

# runfio DEV RW BS QD -> "iops bw_kib" (read or write side, whichever ran)
runfio() {
	fio --name=bench --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" \
		--ioengine=io_uring --direct=1 --time_based --runtime="$RUNTIME" --ramp_time=1 \
		--size="$SIZE" --numjobs=1 --group_reporting \
		--output-format=terse --terse-version=3 |
		awk -F';' -v rw="$2" '{ if (rw ~ /read/) print $8, $7; else print $49, $48 }'
}

report="$work/report.txt"
{
	echo "fio-compare: loop ($loopdev, dio=$loopdio) vs ublk ($ublkdev, $QUEUES queues, depth $DEPTH)"
	echo "backing: tmpfs files of $SIZE; fio io_uring, direct=1, ${RUNTIME}s per row; kernel $(uname -r), $(nproc) CPUs"
	printf '%-16s %12s %12s %12s %12s %8s\n' row loop_iops loop_MiB/s ublk_iops ublk_MiB/s ratio
} | tee "$report"

min_ratio=
for row in "randread 4k 32" "randwrite 4k 32" "read 1M 8" "write 1M 8"; do
	set -- $row
	name="$1-$2-qd$3"
	l=$(runfio "$loopdev" "$1" "$2" "$3")
	u=$(runfio "$ublkdev" "$1" "$2" "$3")
	echo "$l $u" | awk -v n="$name" '{
		r = ($1 > 0) ? $3 / $1 : 0
		printf "%-16s %12d %12.1f %12d %12.1f %8.2f\n", n, $1, $2 / 1024, $3, $4 / 1024, r
	}' | tee -a "$report"
done

kill -TERM "$server"
wait "$server" || die "dev serve failed at exit: $(cat "$work/ublk.log")"
server=

if [ -n "$OUT" ]; then
	mkdir -p "$OUT"
	cp "$report" "$OUT/fio-compare.txt"
	echo "report: $OUT/fio-compare.txt"
fi
