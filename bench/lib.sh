# bench/lib.sh: what the benchmark scripts in one VM boot share (sourced by
# run.sh and direct.sh). The caller sets SIZE_MB (device size), RUNTIME
# (seconds per time-based run), chunk (bytes), raw (the CSV that record
# appends to) and an array loops (the loop devices to detach at the end).

die() { echo "bench: $*" >&2; exit 1; }
say() { echo "bench: $*" >&2; }

# fill FILE: a tmpfs file of the bench size, every byte written, so no row
# reads holes.
fill() {
	truncate -s "${SIZE_MB}M" "$1"
	fio --name=fill --filename="$1" --rw=write --bs=1M --size="${SIZE_MB}M" \
		--ioengine=psync --output-format=terse >/dev/null || die "filling $1 failed"
}

# loopdev FILE: a loop device over FILE, with direct I/O when possible.
loopdev() {
	local l
	l=$(losetup --find --show --direct-io=on "$1" 2>/dev/null) || l=$(losetup --find --show "$1") ||
		die "losetup $1 failed"
	loops+=("$l")
	echo "$l"
}

# fiojob DIR FIO-ARGS...: one fio job; prints "iops mib_s clat_p50_us" of
# its DIR (read or write) side.
fiojob() {
	local dir=$1
	shift
	fio --name=job --numjobs=1 "$@" --output-format=json |
		jq -r --arg d "$dir" '.jobs[0][$d] | "\(.iops) \(.bw / 1024) \((.clat_ns.percentile["50.000000"] // 0) / 1000)"'
}

# fiorun DEV ROW: run ROW's fio job on DEV and print "iops mib_s clat_p50_us".
fiorun() {
	local dev=$1 row=$2 dir=write args
	case $row in
	first4k) # one pass: without number_ios fio wraps around until SIZE bytes are written
		args=(--rw=write:$((chunk - 4096)) --bs=4k --iodepth=32 --number_ios=$((SIZE_MB * 1048576 / chunk))) ;;
	randw4k) args=(--rw=randwrite --bs=4k --iodepth=32 --time_based --runtime="$RUNTIME" --ramp_time=1) ;;
	first1m | write1m) args=(--rw=write --bs=1M --iodepth=8 --size="${SIZE_MB}M") ;;
	randr4k) dir=read args=(--rw=randread --bs=4k --iodepth=32 --time_based --runtime="$RUNTIME" --ramp_time=1) ;;
	read1m) dir=read args=(--rw=read --bs=1M --iodepth=8 --time_based --runtime="$RUNTIME" --ramp_time=1) ;;
	lat4k) dir=read args=(--rw=randread --bs=4k --iodepth=1 --time_based --runtime="$RUNTIME" --ramp_time=1) ;;
	*) die "unknown row $row" ;;
	esac
	fiojob "$dir" --filename="$dev" --ioengine=io_uring --direct=1 --size="${SIZE_MB}M" "${args[@]}"
}

# record ROW CONTENDER RUN DEV
record() {
	local res
	res=$(fiorun "$4" "$1") || die "fio $1 on $2 ($4) failed"
	set -- "$1" "$2" "$3" $res
	echo "$1,$2,$3,$4,$5,$6" >>"$raw"
	say "run $3 $2 $1: $4 IOPS, $5 MiB/s, p50 $6 µs"
}

