#!/bin/sh
# fio-compare.sh [OUTDIR]: fio on the kernel loop device against the ublk
# pass-through device (ublksnap dev serve), each over its own tmpfs backing
# file of the same size, inside one boot of the ublk VM (make bench runs it
# through test/vm/run). Rows: 4 KiB randread and randwrite at QD32, 1 MiB
# sequential read and write at QD8; io_uring engine, direct I/O, time based.
#
# Every ublk variant (BENCH_VARIANTS) gets its own device; each row runs
# BENCH_REPEAT times, cycling loop and the variants, and keeps the best run
# of each device, which damps the noise of a shared, emulated machine.
#
# It prints IOPS, bandwidth and the ratio ublk/loop per row and variant and,
# when OUTDIR (or $UBLKSNAP_VM_OUT) is set, writes OUTDIR/fio-compare.txt.
#
# Environment: UBLKSNAP (binary, default bin/ublksnap), BENCH_SIZE (default
# 256M), BENCH_RUNTIME (seconds per run, default 5), BENCH_REPEAT (default
# 3), BENCH_QUEUES (ublk queues, default 2), BENCH_DEPTH (ublk queue depth,
# default 128), BENCH_VARIANTS ('|'-separated NAME:FLAGS of extra
# "dev serve" flags, default "pread:|mmap:--mmap").
set -eu

UBLKSNAP=${UBLKSNAP:-bin/ublksnap}
OUT=${1:-${UBLKSNAP_VM_OUT:-}}
SIZE=${BENCH_SIZE:-256M}
RUNTIME=${BENCH_RUNTIME:-5}
REPEAT=${BENCH_REPEAT:-3}
QUEUES=${BENCH_QUEUES:-2}
DEPTH=${BENCH_DEPTH:-128}
VARIANTS=${BENCH_VARIANTS:-pread:|mmap:--mmap}

die() { echo "fio-compare: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "needs root (run it in the VM: make bench)"
[ -e /dev/ublk-control ] || die "no /dev/ublk-control: run it in the VM (make bench)"
command -v fio >/dev/null || die "fio is not installed"
[ -x "$UBLKSNAP" ] || die "$UBLKSNAP missing: make build"
"$UBLKSNAP" dev serve --help >/dev/null 2>&1 || die "$UBLKSNAP has no 'dev serve' command"

work=$(mktemp -d /tmp/fio-compare.XXXXXX)
loopdev=
servers=
cleanup() {
	for pid in $servers; do kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
	[ -n "$loopdev" ] && losetup -d "$loopdev" 2>/dev/null
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# mkbacking FILE: a fully written file, so that no row reads holes.
mkbacking() {
	truncate -s "$SIZE" "$1"
	fio --name=fill --filename="$1" --rw=write --bs=1M --size="$SIZE" \
		--ioengine=psync --output-format=terse >/dev/null || die "filling $1 failed"
}

mkbacking "$work/loop.img"
loopdev=$(losetup --find --show --direct-io=on "$work/loop.img" 2>/dev/null) ||
	loopdev=$(losetup --find --show "$work/loop.img") || die "losetup failed"
loopdio=$(cat "/sys/block/${loopdev#/dev/}/loop/dio" 2>/dev/null || echo "?")

# Start one ublk device per variant: names in $names, devices in $devs.
names=
devs=
i=0
oldifs=$IFS
IFS='|'
for v in $VARIANTS; do
	IFS=$oldifs
	i=$((i + 1))
	name=${v%%:*}
	flags=${v#*:}
	mkbacking "$work/ublk$i.img"
	# shellcheck disable=SC2086 # flags are words
	"$UBLKSNAP" dev serve --backing "$work/ublk$i.img" --queues "$QUEUES" --depth "$DEPTH" $flags \
		>"$work/ublk$i.path" 2>"$work/ublk$i.log" &
	servers="$servers $!"
	n=0
	while [ ! -s "$work/ublk$i.path" ]; do
		n=$((n + 1))
		[ $n -gt 300 ] && die "ublk device $name did not come up: $(cat "$work/ublk$i.log")"
		kill -0 "$!" 2>/dev/null || die "dev serve ($name) exited: $(cat "$work/ublk$i.log")"
		sleep 0.1
	done
	names="$names $name"
	devs="$devs $(cat "$work/ublk$i.path")"
	IFS='|'
done
IFS=$oldifs

# runfio DEV RW BS QD -> "iops bw_kib" (read or write side, whichever ran)
runfio() {
	fio --name=bench --filename="$1" --rw="$2" --bs="$3" --iodepth="$4" \
		--ioengine=io_uring --direct=1 --time_based --runtime="$RUNTIME" --ramp_time=1 \
		--size="$SIZE" --numjobs=1 \
		--output-format=terse --terse-version=3 |
		awk -F';' -v rw="$2" '{ if (rw ~ /read/) print $8, $7; else print $49, $48 }'
}

report="$work/report.txt"
{
	echo "fio-compare: loop ($loopdev, dio=$loopdio) vs ublk pass-through ($QUEUES queues, depth $DEPTH):"
	set -- $devs
	for n in $names; do
		echo "  $n = $1"
		shift
	done
	echo "backing: tmpfs files of $SIZE; fio io_uring, direct=1, numjobs=1, ${RUNTIME}s per run, best of $REPEAT"
	echo "kernel $(uname -r), $(nproc) CPUs"
	printf '%-16s %9s %9s' row loop_iops loop_MiB/s
	for n in $names; do printf ' | %-6s %9s %9s %6s' "$n" iops MiB/s ratio; done
	echo
} | tee "$report"

for row in "randread 4k 32" "randwrite 4k 32" "read 1M 8" "write 1M 8"; do
	set -- $row
	rw=$1 bs=$2 qd=$3
	best="$work/best"
	: >"$best"
	r=0
	while [ $r -lt "$REPEAT" ]; do
		r=$((r + 1))
		for d in $loopdev $devs; do
			echo "$d $(runfio "$d" "$rw" "$bs" "$qd")" >>"$best"
		done
	done
	awk -v row="$rw-$bs-qd$qd" -v order="$loopdev $devs" -v names="$names" '
		{ if ($2 > iops[$1]) { iops[$1] = $2; bw[$1] = $3 } }
		END {
			n = split(order, d, " "); split(names, nm, " ")
			printf "%-16s %9d %9.1f", row, iops[d[1]], bw[d[1]] / 1024
			for (i = 2; i <= n; i++)
				printf " | %-6s %9d %9.1f %6.2f", nm[i-1], iops[d[i]], bw[d[i]] / 1024, (iops[d[1]] > 0) ? iops[d[i]] / iops[d[1]] : 0
			printf "\n"
		}' "$best" | tee -a "$report"
done

for pid in $servers; do
	kill -TERM "$pid"
	wait "$pid" || die "dev serve (pid $pid) failed at exit"
done
servers=

if [ -n "$OUT" ]; then
	mkdir -p "$OUT"
	cp "$report" "$OUT/fio-compare.txt"
	echo "report: $OUT/fio-compare.txt"
fi
