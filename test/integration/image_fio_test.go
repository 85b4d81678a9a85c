//go:build vmtest

package integration

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"strings"
	"sync"
	"testing"

	"github.com/ublksnap/ublksnap/internal/testwait"
)

// TestImageFioVerify checks the data of images in every I/O mode the
// kernel offers (a mode it lacks is skipped and says so): fio writes a
// verifiable pattern over the original, a snapshot is taken, fio
// overwrites part of the original (those chunks are copied into the
// difference storage), and the image must still hold the pattern: fio
// verifies it, and direct reads of 4 KiB at random, 1 MiB in sequence and
// 512 B–1 MiB at random match what the original held at the take, so
// reads come from the original, the storage and memory, also within one
// request. Then fio writes and verifies mixed sizes on the writable image.
func TestImageFioVerify(t *testing.T) {
	const size = 24 << 20
	pattern := []string{"--name=pattern", "--rw=write", "--bs=64k", "--size=16M",
		"--ioengine=io_uring", "--iodepth=16", "--direct=1", "--verify=crc32c", "--verify_fatal=1"}
	for _, mode := range []string{"copy", "user-copy", "zero-copy"} {
		t.Run(mode, func(t *testing.T) {
			d := startDaemon(t)
			backing := tempFile(t, size)
			out, errOut, err := d.try("attach", "--backing", backing, "--io-mode", mode)
			if err != nil && strings.Contains(errOut, "not supported by this kernel") {
				t.Skipf("this kernel has no %s mode: %s", mode, errOut)
			}
			if err != nil {
				t.Fatalf("attach --io-mode %s: %v: %s", mode, err, errOut)
			}
			dev := strings.TrimSpace(out)
			fio(t, append(pattern, "--filename="+dev, "--do_verify=0")...)
			_, images := d.snapshot(t.TempDir(), "128MiB", dev)
			st := d.status()
			if len(st.Snapshots) != 1 || len(st.Snapshots[0].Devices) != 1 || st.Snapshots[0].Devices[0].ImageIOMode != mode {
				t.Errorf("status %+v: want one image in %s mode (its device's)", st, mode)
			}
			want, err := os.ReadFile(backing) // the original at the take
			if err != nil {
				t.Fatal(err)
			}
			fio(t, "--name=overwrite", "--filename="+dev, "--rw=randwrite", "--bs=4k", "--size=8M",
				"--ioengine=io_uring", "--iodepth=16", "--direct=1", "--number_ios=1000", "--randseed=7")

			fio(t, append(pattern, "--filename="+images[0], "--verify_only=1")...)
			checkDirectReads(t, images[0], want)
			fio(t, "--name=image-write", "--filename="+images[0], "--offset=16M", "--size=8M",
				"--rw=randwrite", "--bsrange=512-1m", "--ioengine=io_uring", "--iodepth=16", "--direct=1",
				"--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
		})
	}
}

// checkDirectReads reads dev with O_DIRECT, 4 KiB at random, 1 MiB in
// sequence and 512 B to 1 MiB at random, and compares with want.
func checkDirectReads(t *testing.T, dev string, want []byte) {
	t.Helper()
	f, buf := openDirect(t, dev, os.O_RDONLY)
	defer f.Close()
	rnd := rand.New(rand.NewSource(1))
	read := func(off int64, n int) {
		if _, err := f.ReadAt(buf[:n], off); err != nil {
			t.Fatalf("read %d at %d of %s: %v", n, off, dev, err)
		}
		if !bytes.Equal(buf[:n], want[off:off+int64(n)]) {
			t.Fatalf("read %d at %d of %s: not the data of the take", n, off, dev)
		}
	}
	sectors := int64(len(want)) >> 9
	for range 500 {
		read(rnd.Int63n(sectors>>3)<<12, 4096)
	}
	for off := int64(0); off < int64(len(want)); off += 1 << 20 {
		read(off, 1<<20)
	}
	for range 200 {
		n := (1 + rnd.Intn(2048)) << 9
		read(rnd.Int63n(sectors-int64(n>>9)+1)<<9, n)
	}
}

// TestCOWFioVerifyConcurrent runs fio on the original and on its image at
// once, with a snapshot held whose storage (a growable file of 2 MiB
// steps) must grow several times while they run, with chunks saved by an
// in-kernel copy and through buffers: fio verifies a pattern it writes
// over the original at random sizes (each write a first write or an
// overwrite), the pattern of the take on the image (read while its chunks
// are being copied), and a pattern it writes on the image beside it. At
// the end the image still holds the data of the take, byte for byte.
func TestCOWFioVerifyConcurrent(t *testing.T) {
	const (
		size    = 32 << 20
		pattern = 24 << 20 // [0, pattern): written on the original after the take; the rest on the image
	)
	take := []string{"--name=take", "--rw=write", "--bs=64k", "--offset=0", "--size=24M",
		"--ioengine=io_uring", "--iodepth=16", "--direct=1", "--verify=crc32c", "--verify_fatal=1"}
	for _, inKernel := range []string{"1", "0"} {
		t.Run("chunk-copy-in-kernel="+inKernel, func(t *testing.T) {
			d := startDaemon(t, "--chunk-copy-in-kernel", inKernel, "--diff-storage-minimum", "2MiB")
			backing, dev := d.attach(size)
			fio(t, append(take, "--filename="+dev, "--do_verify=0")...)
			id, images := d.snapshot(t.TempDir(), "64MiB", dev)
			want, err := os.ReadFile(backing) // the original at the take
			if err != nil {
				t.Fatal(err)
			}
			before := d.snapshotStatus(t, id)

			jobs := [][]string{
				{"--name=original", "--filename=" + dev, "--rw=randwrite", "--bsrange=4k-256k",
					"--offset=0", "--size=24M", "--ioengine=io_uring", "--iodepth=16", "--direct=1",
					"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randseed=11"},
				append(take, "--filename="+images[0], "--verify_only=1", "--loops=2"),
				{"--name=image", "--filename=" + images[0], "--rw=randwrite", "--bsrange=512-1m",
					"--offset=24M", "--size=8M", "--ioengine=io_uring", "--iodepth=16", "--direct=1",
					"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--randseed=12"},
			}
			var wg sync.WaitGroup
			errs := make([]error, len(jobs))
			outs := make([]string, len(jobs))
			for i, job := range jobs {
				wg.Go(func() { outs[i], errs[i] = runErr("fio", append([]string{"--output-format=terse"}, job...)...) })
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Errorf("fio %s: %v\n%s", jobs[i][0], err, outs[i])
				}
			}

			after := d.snapshotStatus(t, id)
			if after.State != "taken" {
				t.Fatalf("snapshot %s is %s after the run, want taken", id, after.State)
			}
			copied, inKernelCopied := after.Devices[0].ChunksCopied, after.Devices[0].ChunksCopiedInKernel
			t.Logf("chunks copied %d (%d in the kernel), storage %d B of %d B (was %d B)",
				copied, inKernelCopied, after.Storage.Used, after.Storage.Capacity, before.Storage.Capacity)
			if copied < pattern/after.Devices[0].ChunkSize/2 {
				t.Errorf("only %d chunks copied: the writes met too few uncopied chunks", copied)
			}
			if (inKernelCopied > 0) != (inKernel == "1") {
				t.Errorf("%d chunks copied in the kernel with chunk_copy_in_kernel=%s", inKernelCopied, inKernel)
			}
			if after.Storage.Capacity < before.Storage.Capacity+3*(2<<20) {
				t.Errorf("storage grew from %d B to %d B: want at least three growth steps during the run",
					before.Storage.Capacity, after.Storage.Capacity)
			}
			checkDirectReads(t, images[0], want[:pattern])
		})
	}
}

// daemonStatus is what `status --json` says, as far as the tests read it.
type daemonStatus struct {
	Devices []struct {
		Path     string `json:"path"`
		IOMode   string `json:"io_mode"`
		DirectIO bool   `json:"direct_io"`
	} `json:"devices"`
	Snapshots []snapshotState `json:"snapshots"`
}

// status returns what `status --json` says.
func (d *daemon) status() daemonStatus {
	d.t.Helper()
	var st daemonStatus
	d.cliJSON(&st, "status")
	return st
}

// snapshotState is what `status --json` says of one snapshot.
type snapshotState struct {
	ID      string
	State   string
	Devices []struct {
		Device               string // the member's node
		Image                string // its image's node, once taken
		ImageIOMode          string `json:"image_io_mode"`
		ChunkSize            uint64 `json:"chunk_size"`
		ChunksCopied         uint64 `json:"chunks_copied"`
		ChunksCopiedInKernel uint64 `json:"chunks_copied_in_kernel"`
		ChunksInMemory       uint64 `json:"chunks_in_memory"`
	}
	Storage struct {
		Capacity uint64
		Used     uint64
	}
}

// snapshotStatus returns the status of snapshot id, which must have devices.
func (d *daemon) snapshotStatus(t testing.TB, id string) snapshotState {
	t.Helper()
	st := d.status()
	for _, s := range st.Snapshots {
		if s.ID == id && len(s.Devices) > 0 {
			return s
		}
	}
	t.Fatalf("status shows no snapshot %s with devices: %+v", id, st)
	return snapshotState{}
}

// waitStorageRoom waits until snapshot id's storage has room for need more
// bytes of chunks beside those it holds and those copied into memory (a
// watch process grows it when it runs low); it fails at once if the
// snapshot is corrupted.
func (d *daemon) waitStorageRoom(t testing.TB, id string, need uint64) {
	t.Helper()
	testwait.For(t, fmt.Sprintf("room for %d bytes in the storage of %s", need, id), func() bool {
		s := d.snapshotStatus(t, id)
		if s.State != "taken" {
			t.Fatalf("snapshot %s is %s while waiting for its storage to grow", id, s.State)
		}
		held := s.Storage.Used
		for _, m := range s.Devices {
			held += m.ChunksInMemory * m.ChunkSize
		}
		return s.Storage.Capacity >= held+need
	})
}
