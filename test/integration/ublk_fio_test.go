//go:build vmtest

package integration

import (
	"fmt"
	"testing"

	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// fioVerifyJob is one fio randwrite+verify region on the device.
type fioVerifyJob struct {
	bs, depth    int
	offset, size int64
}

func (j fioVerifyJob) args(file string) []string {
	return []string{
		fmt.Sprintf("--name=bs%d-qd%d", j.bs, j.depth),
		"--filename=" + file,
		"--rw=randwrite", fmt.Sprintf("--bs=%d", j.bs),
		fmt.Sprintf("--offset=%d", j.offset), fmt.Sprintf("--size=%d", j.size),
		"--ioengine=io_uring", fmt.Sprintf("--iodepth=%d", j.depth),
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
		"--randseed=" + fmt.Sprint(j.bs+j.depth),
	}
}

// TestUblkFioVerify writes with fio randwrite + crc32c verify at 4 KiB,
// 64 KiB and 1 MiB blocks and queue depths 1, 32 and 128 on a two-queue
// device, each combination in its own region; after the device is gone, fio
// verifies the same regions in the backing file, so the bytes that reached
// the backing file are the ones written.
func TestUblkFioVerify(t *testing.T) {
	var jobs []fioVerifyJob
	var off int64
	for _, bs := range []int{4 << 10, 64 << 10, 1 << 20} {
		size := map[int]int64{4 << 10: 2 << 20, 64 << 10: 4 << 20, 1 << 20: 8 << 20}[bs]
		for _, depth := range []int{1, 32, 128} {
			jobs = append(jobs, fioVerifyJob{bs, depth, off, size})
			off += size
		}
	}
	d, file, _ := ublkDevice(t, off, 2, 128, nil)
	for _, j := range jobs {
		fio(t, append(j.args(d.Path()), "--direct=1")...)
	}
	closeDevice(t, d)
	for _, j := range jobs {
		fio(t, append(j.args(file), "--verify_only=1")...)
	}
}

// fioVerifyWith runs a 4 KiB and a 64 KiB fio verify on a device served by
// the handler that wrap builds.
func fioVerifyWith(t *testing.T, opts storage.OpenOptions, wrap func(ublk.Handler, *storage.File) ublk.Handler) {
	d, _, _ := ublkDeviceOpts(t, 32<<20, 2, 64, opts, wrap)
	for _, j := range []fioVerifyJob{{4 << 10, 32, 0, 8 << 20}, {64 << 10, 16, 8 << 20, 16 << 20}} {
		fio(t, append(j.args(d.Path()), "--direct=1")...)
	}
}
