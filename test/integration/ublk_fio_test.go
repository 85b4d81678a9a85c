//go:build vmtest

package integration

import (
	"errors"
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

// sizes is fio's block size option: bs, or with bs 0 sizes from 512 B to
// 1 MiB in steps of 512 B, at offsets unaligned to any chunk.
func (j fioVerifyJob) sizes() []string {
	if j.bs == 0 {
		return []string{"--bsrange=512-1m"}
	}
	return []string{fmt.Sprintf("--bs=%d", j.bs)}
}

func (j fioVerifyJob) args(file string) []string {
	return append([]string{
		fmt.Sprintf("--name=bs%d-qd%d", j.bs, j.depth),
		"--filename=" + file,
		"--rw=randwrite",
		fmt.Sprintf("--offset=%d", j.offset), fmt.Sprintf("--size=%d", j.size),
		"--ioengine=io_uring", fmt.Sprintf("--iodepth=%d", j.depth),
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
		"--randseed=" + fmt.Sprint(j.bs+j.depth),
	}, j.sizes()...)
}

// TestUblkFioVerify writes with fio randwrite + crc32c verify at 4 KiB,
// 64 KiB and 1 MiB blocks at queue depths from 1 to 128 on a two-queue
// device, each job in its own region (all side by side), and mixed sizes
// from 512 B to 1 MiB at offsets unaligned to chunks; after the device is
// gone, fio
// verifies the same regions in the backing file, so the bytes that reached
// the backing file are the ones written. It runs in every I/O mode: a mode
// the kernel lacks is skipped and says so, never replaced by another.
func TestUblkFioVerify(t *testing.T) {
	// Block size, depth and size: each size at QD1 and deep, and mixed.
	var jobs []fioVerifyJob
	var off int64
	for _, j := range []struct {
		bs, depth int
		size      int64
	}{{4 << 10, 1, 512 << 10}, {4 << 10, 128, 1 << 20}, {64 << 10, 32, 2 << 20}, {1 << 20, 1, 2 << 20}, {1 << 20, 32, 4 << 20}, {0, 16, 4 << 20}} {
		jobs = append(jobs, fioVerifyJob{j.bs, j.depth, off, j.size})
		off += j.size
	}
	for _, mode := range []ublk.IOMode{ublk.IOModeCopy, ublk.IOModeUserCopy, ublk.IOModeZeroCopy} {
		t.Run(mode.String(), func(t *testing.T) {
			file := tempFile(t, off)
			d, _, err := ublkDeviceIn(t, file, mode, 2, 128, storage.OpenOptions{}, nil)
			if errors.Is(err, ublk.ErrNotSupported) {
				t.Skipf("this kernel has no %v mode: %v", mode, err)
			}
			if err != nil {
				t.Fatal(err)
			}
			if got := d.IOMode(); got != mode {
				t.Fatalf("device runs in %v, want %v", got, mode)
			}
			fioVerify(t, d.Path(), jobs, "--direct=1")
			closeDevice(t, d)
			fioVerify(t, file, jobs, "--verify_only=1")
		})
	}
}

// fioVerifyWith runs a 4 KiB and a 64 KiB fio verify on a device served by
// the handler that wrap builds.
func fioVerifyWith(t *testing.T, opts storage.OpenOptions, wrap func(ublk.Handler, *storage.File) ublk.Handler) {
	d, _, _ := ublkDeviceOpts(t, 32<<20, 2, 64, opts, wrap)
	fioVerify(t, d.Path(), []fioVerifyJob{{4 << 10, 32, 0, 8 << 20}, {64 << 10, 16, 8 << 20, 16 << 20}}, "--direct=1")
}

// fioVerify runs the jobs on file in one fio process, side by side (one
// start of fio under TCG costs seconds), global options first.
func fioVerify(t *testing.T, file string, jobs []fioVerifyJob, global ...string) {
	t.Helper()
	args := append([]string(nil), global...)
	for _, j := range jobs {
		args = append(args, j.args(file)...)
	}
	fio(t, args...)
}
