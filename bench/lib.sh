# bench/lib.sh: what the benchmark scripts in one VM boot share (sourced by
# run.sh, cow.sh and direct.sh). The caller sets SIZE_MB (device size), RUNTIME
# (seconds per time-based run), chunk (bytes), raw (the CSV that record
# appends to) and work (the directory whose loop devices detach_loops detaches).

die() { echo "bench: $*" >&2; exit 1; }
say() { echo "bench: $*" >&2; }

# fill FILE: a tmpfs file of the bench size, every byte written, so no row
# reads holes.
fill() {
	truncate -s "${SIZE_MB}M" "$1"
	fio --name=fill --filename="$1" --rw=write --bs=1M --size="${SIZE_MB}M" \
		--ioengine=psync --output-format=terse >/dev/null || die "filling $1 failed"
}

# detach_loops: detaches every loop device over a file under $work (the
# devices loopdev made, also in subshells such as $(loopdev ...)).
detach_loops() {
	local l
	for l in $(losetup --list --noheadings --output NAME,BACK-FILE | awk -v w="$work/" 'index($2, w) == 1 { print $1 }'); do
		losetup -d "$l" 2>/dev/null
	done
}

# loopdev FILE: a loop device over FILE, with direct I/O when possible.
loopdev() {
	local l
	l=$(losetup --find --show --direct-io=on "$1" 2>/dev/null) || l=$(losetup --find --show "$1") ||
		die "losetup $1 failed"
	echo "$l"
}

# fiojob DIR FIO-ARGS...: one fio job (of several processes if FIO-ARGS
# set --numjobs, reported as one); prints "iops mib_s clat_p50_us" of its
# DIR (read or write) side.
fiojob() {
	local dir=$1
	shift
	fio --name=job --numjobs=1 --group_reporting "$@" --output-format=json |
		jq -r --arg d "$dir" '.jobs[0][$d] | "\(.iops) \(.bw / 1024) \((.clat_ns.percentile["50.000000"] // 0) / 1000)"'
}

# fiorun DEV ROW: run ROW's fio job on DEV and print "iops mib_s clat_p50_us".
fiorun() {
	local dev=$1 row=$2 dir=write args
	case $row in
	first4k) # one pass: without number_ios fio wraps around until SIZE bytes are written
		args=(--rw=write:$((chunk - 4096)) --bs=4k --iodepth=32 --number_ios=$((SIZE_MB * 1048576 / chunk))) ;;
	firstlat4k) # the same at QD1, for the latency of one first write
		args=(--rw=write:$((chunk - 4096)) --bs=4k --iodepth=1 --number_ios=$((SIZE_MB * 1048576 / chunk))) ;;
	randw4k) args=(--rw=randwrite --bs=4k --iodepth=32 --time_based --runtime="$RUNTIME" --ramp_time=1) ;;
	randw4k4j) # four processes, which the kernel spreads over the device's queues
		args=(--rw=randwrite --bs=4k --iodepth=32 --numjobs=4 --time_based --runtime="$RUNTIME" --ramp_time=1) ;;
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


# stats RAW ROW CONTENDER: "median q1 q3" of ROW's runs of CONTENDER in RAW,
# in the column that row is judged by (IOPS; MiB/s for 1 MiB rows; p50
# latency for lat4k and firstlat4k).
stats() {
	local col=4
	case $2 in *1m) col=5 ;; *lat4k) col=6 ;; esac
	awk -F, -v row="$2" -v c="$3" -v col="$col" '$1 == row && $2 == c { print $col }' "$1" | sort -g |
		awk '{ v[NR] = $1 } END { printf "%s %s %s\n", v[int((NR + 1) / 2)], v[int((NR + 3) / 4)], v[int((3 * NR + 3) / 4)] }'
}

# dm_setup: the device-mapper contenders over fresh tmpfs files in $work, of
# $sectors sectors with $chunk_sectors chunks: dm-snapshot (bench-origin,
# with dm_fresh, dm_image, dm_done for a persistent snapshot in a COW file
# of $limit_mib MiB) and dm-thin (bench-thin, with thin_fresh, thin_image,
# thin_done for a thin snapshot). The caller's cleanup removes the bench-*
# devices; dm_done and thin_done record metrics with metric.
dm_setup() {
	fill "$work/dm-origin.img"
	dmorigin=$(loopdev "$work/dm-origin.img")
	dmsetup create bench-origin --table "0 $sectors snapshot-origin $dmorigin"
	dmcow=
	dm_fresh() {
		if [ -n "$dmcow" ]; then
			dmsetup remove bench-snap
			losetup -d "$dmcow"
		fi
		rm -f "$work/dm-cow.img"
		truncate -s "${limit_mib}M" "$work/dm-cow.img"
		dmcow=$(loopdev "$work/dm-cow.img")
		dmsetup create bench-snap --table "0 $sectors snapshot $dmorigin $dmcow P $chunk_sectors"
	}
	dm_image() { echo /dev/mapper/bench-snap; }
	dm_done() {
		metric dm_snap_status "$(dmsetup status bench-snap | cut -d' ' -f4-)"
		dmsetup remove bench-snap
		losetup -d "$dmcow"
		rm -f "$work/dm-cow.img"
		dmcow=
	}

	truncate -s 64M "$work/thin-meta.img"
	truncate -s $((3 * SIZE_MB))M "$work/thin-data.img"
	thinmeta=$(loopdev "$work/thin-meta.img")
	thindata=$(loopdev "$work/thin-data.img")
	dd if=/dev/zero of="$thinmeta" bs=4096 count=1 status=none
	dmsetup create bench-pool --table \
		"0 $((3 * sectors)) thin-pool $thinmeta $thindata $chunk_sectors 0 1 skip_block_zeroing"
	dmsetup message bench-pool 0 "create_thin 0"
	dmsetup create bench-thin --table "0 $sectors thin /dev/mapper/bench-pool 0"
	fio --name=fill --filename=/dev/mapper/bench-thin --rw=write --bs=1M --size="${SIZE_MB}M" \
		--ioengine=psync --direct=1 --output-format=terse >/dev/null || die "filling the thin volume failed"
	thinid=0
	thin_fresh() {
		if [ "$thinid" -gt 0 ]; then
			dmsetup remove bench-thinsnap
			dmsetup message bench-pool 0 "delete $thinid"
		fi
		thinid=$((thinid + 1))
		dmsetup suspend bench-thin
		dmsetup message bench-pool 0 "create_snap $thinid 0"
		dmsetup resume bench-thin
		dmsetup create bench-thinsnap --table "0 $sectors thin /dev/mapper/bench-pool $thinid"
	}
	thin_image() { echo /dev/mapper/bench-thinsnap; }
	thin_done() {
		dmsetup remove bench-thinsnap
		dmsetup message bench-pool 0 "delete $thinid"
		thinid=0
	}
}
