//go:build vmtest

package integration

import (
	"bytes"
	"math/rand"
	"os"
	"strings"
	"testing"
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
			var st struct {
				Snapshots []struct {
					Devices []struct {
						ImageIOMode string `json:"image_io_mode"`
					}
				}
			}
			d.cliJSON(&st, "status")
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
