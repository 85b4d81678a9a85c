#!/usr/bin/env bash
# bench/run.sh OUTDIR: one benchmark pass inside one boot of the ublk VM
# (make bench runs it once per kernel line through test/vm/run).
#
# Contenders, each over its own fresh, fully written tmpfs file of the same
# size:
#   loop        the kernel's loop device (--direct-io=on when tmpfs allows it)
#   ublksnap    a filtered device of the ublksnap daemon, in no snapshot
#   ublksnap+s  a filtered device of the same daemon with a snapshot taken
#   dm-snap     dm snapshot-origin with a persistent (P) snapshot on loop
#               devices, chunk size equal to ours
#   dm-thin     a dm-thin volume and a thin snapshot of it, block size equal
#               to our chunk size, no block zeroing
#
# Rows (fio, io_uring, direct=1, one job). First writes are size based on a
# freshly taken snapshot, so that every write meets an uncopied chunk; the
# other rows are time based and run after every chunk has been copied.
#   first4k   4 KiB writes, one per chunk (rw=write:CHUNK-4k), QD32
#   firstlat4k the same at QD1, p50 completion latency
#   randw4k   4 KiB random overwrites, QD32
#   randw4k4j the same from 4 jobs at once (spread over the device's queues)
#   first1m   1 MiB sequential writes over a fresh snapshot, QD8
#   write1m   1 MiB sequential overwrites, QD8
#   randr4k   4 KiB random reads of the image (of the device without one), QD32
#   read1m    1 MiB sequential reads of the image (of the device), QD8
#   lat4k     4 KiB random reads at QD1, p50 completion latency (loop and
#             ublksnap without snapshot only)
#
# Every row runs BENCH_RUNS times, cycling through the contenders, so that a
# slow phase of the host hits every contender alike; the report takes
# medians and quartiles. At the end both ublksnap devices join one snapshot,
# are written and their images read, so the daemon's peak RSS (VmHWM)
# covers two devices and two images; its RssAnon, RssFile and RssShmem are
# sampled every second through the whole run as well.
#
# Two bounds of what user space can move, measured with fio psync on tmpfs:
#   COW bound       reading one chunk and writing one chunk: the least a
#                   first write costs when one copy runs at a time
#   two-copy bound  1 MiB sequential reads and writes (MiB/s each) and
#                   1/(1/read + 1/write): a byte read into a buffer and
#                   written out of it, the two copies of a 1 MiB request
#                   in ublk's copy mode (6.12 has no zero copy)
#
# Output in OUTDIR: raw.csv (row,contender,run,iops,mib_s,clat_p50_us) and
# meta.csv (key,value), which bench/report turns into tables and a chart,
# CPU profiles of the daemon (profile-*.pb.gz, from its /debug/pprof), and
# rss-peaks (the sampled peaks so far, kept should the run not finish).
#
# Environment: UBLKSNAP (binary, default bin/ublksnap), BENCH_SIZE (MiB,
# default 256), BENCH_RUNTIME (seconds per time-based run, default 4),
# BENCH_RUNS (default 5), BENCH_CHUNK_SHIFT (default 18: 256 KiB).
set -euo pipefail

UBLKSNAP=${UBLKSNAP:-bin/ublksnap}
OUT=${1:-${UBLKSNAP_VM_OUT:-}}
SIZE_MB=${BENCH_SIZE:-256}
RUNTIME=${BENCH_RUNTIME:-4}
RUNS=${BENCH_RUNS:-5}
CHUNK_SHIFT=${BENCH_CHUNK_SHIFT:-18}

# die, say, fill, loopdev, fiojob, fiorun, record
. "$(dirname "$0")/lib.sh"
[ -n "$OUT" ] || die "usage: bench/run.sh OUTDIR"
[ "$(id -u)" = 0 ] || die "needs root (run it in the VM: make bench)"
[ -e /dev/ublk-control ] || die "no /dev/ublk-control: run it in the VM (make bench)"
for t in fio jq losetup dmsetup; do command -v $t >/dev/null || die "$t is not installed"; done
[ -x "$UBLKSNAP" ] || die "$UBLKSNAP missing: make build"

chunk=$((1 << CHUNK_SHIFT))
chunk_sectors=$((chunk / 512))
sectors=$((SIZE_MB * 2048))
# Without udev, libdevmapper makes the /dev/mapper nodes itself.
export DM_DISABLE_UDEV=1

work=$(mktemp -d /tmp/bench.XXXXXX)
# Its own tmpfs: the guest's /tmp is capped at half the memory, and the
# contenders' files together take about 9 × the device size at their peak.
mount -t tmpfs -o size=90% bench "$work" || die "cannot mount a tmpfs on $work"
sock=$work/ublksnap.sock
daemon_pid=
sampler_pid=
mkdir -p "$OUT"
raw=$OUT/raw.csv
meta=$OUT/meta.csv
echo "row,contender,run,iops,mib_s,clat_p50_us" >"$raw"
echo "key,value" >"$meta"

u() { "$UBLKSNAP" --socket "$sock" "$@"; }
cleanup() {
	set +e
	for d in bench-thinsnap bench-thin bench-pool bench-snap bench-origin; do
		dmsetup remove "$d" 2>/dev/null
	done
	detach_loops
	[ -n "$sampler_pid" ] && kill "$sampler_pid" 2>/dev/null
	if [ -n "$daemon_pid" ]; then
		u shutdown --force
		wait "$daemon_pid" 2>/dev/null
	fi
	umount "$work"
	rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

metric() { echo "$1,$2" >>"$meta"; }

# rows CONTENDER RUN ORIGIN FRESH IMAGE-OF: the eight rows. FRESH is a
# command that (re)creates a freshly taken snapshot, or ":" for a device
# without one; IMAGE-OF prints the device the read rows use.
rows() {
	local c=$1 r=$2 dev=$3 fresh=$4 imageof=$5
	$fresh
	record first4k "$c" "$r" "$dev"
	$fresh
	record firstlat4k "$c" "$r" "$dev"
	$fresh
	record first1m "$c" "$r" "$dev"
	record write1m "$c" "$r" "$dev"
	record randw4k "$c" "$r" "$dev"
	record randw4k4j "$c" "$r" "$dev"
	record randr4k "$c" "$r" "$($imageof "$dev")"
	record read1m "$c" "$r" "$($imageof "$dev")"
}
same() { echo "$1"; }

# --- the contenders ---------------------------------------------------------

say "kernel $(uname -r), $(nproc) CPUs, ${SIZE_MB} MiB devices, chunk $chunk bytes"
metric kernel "$(uname -r)"
metric cpus "$(nproc)"
metric size_mib "$SIZE_MB"
metric chunk_bytes "$chunk"
metric runtime_s "$RUNTIME"
metric runs "$RUNS"

fill "$work/loop.img"
loop=$(loopdev "$work/loop.img")
metric loop_dio "$(cat "/sys/block/${loop#/dev/}/loop/dio" 2>/dev/null || echo unknown)"

limit_mib=$((SIZE_MB + 64)) # room for the store's metadata
limit=${limit_mib}MiB
"$UBLKSNAP" daemon --socket "$sock" --chunk-minimum-shift "$CHUNK_SHIFT" \
	--diff-storage-minimum "$limit" 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do u status >/dev/null 2>&1 && break; sleep 0.2; done
u status >/dev/null || die "the daemon did not start: $(cat "$work/daemon.log")"
# The daemon re-executes itself from an I/O-flusher thread: the server is
# the child of the process started here.
server_pid=$(pgrep -P "$daemon_pid" | head -1 || true)
server_pid=${server_pid:-$daemon_pid}

# rss_peaks PEAKS: PEAKS ("anon file shmem", KiB) raised to the server's
# RssAnon, RssFile and RssShmem now; fails once the server is gone.
rss_peaks() {
	awk -v peaks="$1" 'BEGIN { n = split("RssAnon: RssFile: RssShmem:", key, " "); split(peaks, m, " ") }
		{ for (i = 1; i <= n; i++) if ($1 == key[i] && $2 > m[i]) m[i] = $2 }
		END { print m[1] + 0, m[2] + 0, m[3] + 0 }' "/proc/$server_pid/status" 2>/dev/null
}
(
	peaks="0 0 0"
	while peaks=$(rss_peaks "$peaks"); do
		echo "$peaks" >"$OUT/rss-peaks"
		sleep 1
	done
) &
sampler_pid=$!

fill "$work/ublk1.img"
fill "$work/ublk2.img"
ublk1=$(u attach --backing "$work/ublk1.img" --name bench1)
ublk2=$(u attach --backing "$work/ublk2.img" --name bench2)
# status_field FIELD: FIELD of the first device in `status --json`, or
# "unknown" if it has none.
status_field() {
	u --json status | jq -r --arg f "$1" '.devices[0][$f] | if . == null then "unknown" else tostring end' ||
		echo unknown
}
metric ublksnap_io_mode "$(status_field io_mode)"
metric ublksnap_direct_io "$(status_field direct_io)"
mkdir -p "$work/diff"
snapid=
ublk_fresh() {
	[ -n "$snapid" ] && u snapshot destroy --id "$snapid" >/dev/null
	snapid=$(u snapshot create --device "$ublk2" --storage "$work/diff" --limit "$limit")
	u snapshot take --id "$snapid" >/dev/null
}
ublk_image() { u snapshot info --device "$1" | sed -n 's/^image=//p'; }
ublk_done() {
	metric ublksnap_diff_used_bytes "$(u --json status | jq '.snapshots[0].storage.used')"
	u snapshot destroy --id "$snapid" >/dev/null
	snapid=
}

dm_setup

# --- the runs ---------------------------------------------------------------

for r in $(seq 1 "$RUNS"); do
	rows loop "$r" "$loop" : same
	record lat4k loop "$r" "$loop"
	rows ublksnap "$r" "$ublk1" : same
	record lat4k ublksnap "$r" "$ublk1"
	rows ublksnap+s "$r" "$ublk2" ublk_fresh ublk_image
	ublk_done
	rows dm-snap "$r" /dev/mapper/bench-origin dm_fresh dm_image
	dm_done
	rows dm-thin "$r" /dev/mapper/bench-thin thin_fresh thin_image
	thin_done
done

# --- CPU profiles of the daemon -------------------------------------------
# PROFILE NAME FRESH ROW DEV: a CPU profile of the daemon while ROW runs on
# DEV again and again (after FRESH each time) for BENCH_RUNTIME seconds.
profile() {
	local name=$1 fresh=$2 row=$3 dev=$4
	curl -sf --unix-socket "$sock" -o "$OUT/profile-$name.pb.gz" \
		"http://ublksnap/debug/pprof/profile?seconds=$RUNTIME" &
	local cpid=$!
	while kill -0 "$cpid" 2>/dev/null; do
		$fresh
		fiorun "$dev" "$row" >/dev/null
	done
	wait "$cpid" || die "profile $name failed"
}
if command -v curl >/dev/null; then
	profile write4k-nosnap : randw4k "$ublk1"
	profile read1m-nosnap : read1m "$ublk1"
	profile first4k-snap ublk_fresh first4k "$ublk2"
	# 1 MiB reads of an image whose every chunk is copied.
	fiorun "$ublk2" first1m >/dev/null
	profile read1m-image : read1m "$(ublk_image "$ublk2")"
	ublk_done
else
	say "no curl: no profiles"
fi

# --- the COW and two-copy bounds -------------------------------------------
# bound FILE RW BS FIELD: FIELD (1: IOPS, 2: MiB/s) of user space's buffered
# psync I/O on a tmpfs file.
bound() {
	local dir=write
	[[ $2 == *read ]] && dir=read
	fiojob "$dir" --filename="$1" --rw="$2" --bs="$3" --ioengine=psync --direct=0 --size="${SIZE_MB}M" \
		--time_based --runtime="$RUNTIME" --ramp_time=1 | cut -d' ' -f"$4"
}
fill "$work/bound-src.img"
# COW: one chunk read and one chunk written (to a new file, as the difference
# storage is), the least time one first write takes when one copy runs at a
# time.
rd=$(bound "$work/bound-src.img" randread "$chunk" 1)
wr=$(bound "$work/bound-dst.img" randwrite "$chunk" 1)
metric cow_bound_read_chunks_s "$rd"
metric cow_bound_write_chunks_s "$wr"
say "COW bound: $rd chunk reads/s, $wr chunk writes/s"
# Two copies: what user space moves reading 1 MiB into a buffer and writing
# it out (over written data, as the backing is), the two copies of a 1 MiB
# request in ublk's copy mode.
rd=$(bound "$work/bound-src.img" read 1M 2)
wr=$(bound "$work/bound-src.img" write 1M 2)
rm -f "$work/bound-src.img" "$work/bound-dst.img"
two_copy=$(awk -v r="$rd" -v w="$wr" 'BEGIN { print (r > 0 && w > 0) ? 1 / (1 / r + 1 / w) : 0 }')
metric two_copy_read_mib_s "$rd"
metric two_copy_write_mib_s "$wr"
metric two_copy_bound_mib_s "$two_copy"
say "two-copy bound: $rd MiB/s read, $wr MiB/s written, $two_copy MiB/s both"

# --- two devices, two images: the daemon's peak memory ---------------------
snapid=$(u snapshot create --device "$ublk1" --device "$ublk2" --storage "$work/diff" --limit $((2 * SIZE_MB + 64))MiB)
u snapshot take --id "$snapid" >/dev/null
for d in "$ublk1" "$ublk2"; do
	fiorun "$d" first1m >/dev/null
	fiorun "$(ublk_image "$d")" read1m >/dev/null
done
u snapshot destroy --id "$snapid" >/dev/null
snapid=
kill "$sampler_pid" 2>/dev/null || true
wait "$sampler_pid" 2>/dev/null || true
sampler_pid=
# (no process substitution: the VM has no /dev/fd)
peaks=$(rss_peaks "$(cat "$OUT/rss-peaks" 2>/dev/null || echo 0 0 0)")
read -r anon file shmem <<<"$peaks"
hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$server_pid/status")
metric daemon_vmhwm_kib "$hwm"
metric daemon_peak_rss_anon_kib "$anon"
metric daemon_peak_rss_file_kib "$file"
metric daemon_peak_rss_shmem_kib "$shmem"
metric diff_buffer_memory_limit_bytes $((64 << 20))
say "daemon peak RSS: $hwm KiB (sampled peaks: anon $anon, file $file, shmem $shmem KiB)"
say "results in $OUT"
