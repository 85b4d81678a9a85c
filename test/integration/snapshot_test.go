//go:build vmtest

package integration

import (
	"bytes"
	"context"
	"crypto/md5"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// smallStorage are daemon flags that make the difference storage grow in
// small steps, so tests need little memory on the guest's tmpfs.
var smallStorage = []string{"--diff-storage-minimum", "8MiB"}

// deviceMD5 returns the md5 of a whole block device, read with O_DIRECT.
func deviceMD5(t testing.TB, dev string) string {
	t.Helper()
	sum, err := deviceMD5Err(dev)
	if err != nil {
		t.Fatalf("read %s: %v", dev, err)
	}
	return sum
}

func deviceMD5Err(dev string) (string, error) {
	f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		return "", err
	}
	defer f.Close()
	buf, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		return "", err
	}
	defer unix.Munmap(buf)
	h := md5.New()
	for {
		n, err := f.Read(buf)
		h.Write(buf[:n])
		if err == io.EOF {
			return hex.EncodeToString(h.Sum(nil)), nil
		}
		if err != nil {
			return "", err
		}
	}
}

// openDirect opens dev with O_DIRECT and flag and returns it with a 1 MiB
// page-aligned buffer, unmapped at cleanup.
func openDirect(t testing.TB, dev string, flag int) (*os.File, []byte) {
	t.Helper()
	f, err := os.OpenFile(dev, flag|unix.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	buf, err := unix.Mmap(-1, 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	if err != nil {
		f.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() { unix.Munmap(buf) })
	return f, buf
}

// fillRandom overwrites length bytes of dev at off with fresh random data,
// with O_DIRECT writes of up to 1 MiB (in-process: fio's start-up costs
// seconds under emulation).
func fillRandom(t testing.TB, dev string, off, length int64) {
	t.Helper()
	f, buf := openDirect(t, dev, os.O_WRONLY)
	defer f.Close()
	rnd := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), uint64(off)))
	for pos := off; pos < off+length; {
		n := min(int64(len(buf)), off+length-pos)
		for i := int64(0); i < n; i += 8 {
			binary.LittleEndian.PutUint64(buf[i:], rnd.Uint64())
		}
		if _, err := f.WriteAt(buf[:n], pos); err != nil {
			t.Fatalf("write %s at %d: %v", dev, pos, err)
		}
		pos += n
	}
}

func TestSnapshotUnderFio(t *testing.T) {
	d := startDaemon(t)
	_, dev := d.attach(384 << 20)
	dir := mkfsMount(t, dev)
	writeSums(t, dir, writeTree(t, dir, 40))

	// fio writes and verifies its own file on the original during the take
	// and during the reads of the image.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	fioDone := make(chan error, 1)
	var fioOut bytes.Buffer
	go func() {
		cmd := exec.CommandContext(ctx, "fio", "--name=load", "--filename="+filepath.Join(dir, "fio.dat"),
			"--size=96M", "--rw=randwrite", "--bs=16k", "--ioengine=io_uring", "--iodepth=16", "--direct=1",
			"--verify=crc32c", "--do_verify=1", "--time_based", "--runtime=12")
		cmd.Stdout, cmd.Stderr = &fioOut, &fioOut
		fioDone <- cmd.Run()
	}()
	time.Sleep(3 * time.Second)
	_, images := d.snapshot(t.TempDir(), "512MiB", dev)
	img := mountRO(t, images[0])
	checkSumsFile(t, img)
	run(t, "umount", img)
	run(t, "fsck.ext4", "-fn", images[0])
	if err := <-fioDone; err != nil {
		t.Fatalf("fio on the original during the snapshot: %v\n%s", err, fioOut.String())
	}
}

func TestSnapshotWritableImage(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	_, dev := d.attach(128 << 20)
	dir := mkfsMount(t, dev)
	writeSums(t, dir, writeTree(t, dir, 30))
	run(t, "umount", dir)
	before := deviceMD5(t, dev)
	_, images := d.snapshot(t.TempDir(), "128MiB", dev)

	img := t.TempDir()
	run(t, "mount", images[0], img)
	extra := writeTree(t, filepath.Join(img), 10) // overwrites some listed files too
	run(t, "umount", img)
	run(t, "mount", images[0], img)
	checkTree(t, img, extra)
	run(t, "umount", img)
	run(t, "fsck.ext4", "-fn", images[0])
	if after := deviceMD5(t, dev); after != before {
		t.Fatal("writing to the image changed the original device")
	}
}

// TestSnapshotMultiDeviceSameInstant writes an increasing sequence number to
// two devices in turn (A then B) while the snapshot of both is taken: if
// both switch at one instant, image A holds n and image B holds n or n-1.
func TestSnapshotMultiDeviceSameInstant(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	_, devA := d.attach(64 << 20)
	_, devB := d.attach(64 << 20)
	open := func(dev string) *os.File {
		f, err := os.OpenFile(dev, os.O_RDWR|unix.O_DIRECT|unix.O_DSYNC, 0)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	a, b := open(devA), open(devB)
	buf, _ := unix.Mmap(-1, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_ANON|unix.MAP_PRIVATE)
	defer unix.Munmap(buf)
	stop := make(chan struct{})
	var wg sync.WaitGroup
	var writeErr error
	var last uint64
	wg.Add(1)
	go func() {
		defer wg.Done()
		for n := uint64(1); ; n++ {
			select {
			case <-stop:
				last = n - 1
				return
			default:
			}
			binary.LittleEndian.PutUint64(buf, n)
			for _, f := range []*os.File{a, b} {
				if _, err := f.WriteAt(buf, 1<<20); err != nil {
					writeErr = err
					return
				}
			}
		}
	}()
	time.Sleep(500 * time.Millisecond)
	_, images := d.snapshot(t.TempDir(), "64MiB", devA, devB)
	time.Sleep(500 * time.Millisecond)
	close(stop)
	wg.Wait()
	if writeErr != nil {
		t.Fatalf("sequence writes: %v", writeErr)
	}
	seq := func(dev string) uint64 {
		f, err := os.OpenFile(dev, os.O_RDONLY|unix.O_DIRECT, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.ReadAt(buf, 1<<20); err != nil {
			t.Fatal(err)
		}
		return binary.LittleEndian.Uint64(buf)
	}
	na, nb := seq(images[0]), seq(images[1])
	t.Logf("images show A=%d B=%d; the writer reached %d", na, nb, last)
	if na == 0 || na >= last {
		t.Fatalf("image A shows %d; want a number written before the take (writer reached %d)", na, last)
	}
	if nb != na && nb != na-1 {
		t.Fatalf("images show A=%d, B=%d: not one instant (want B = A or A-1)", na, nb)
	}
}

func TestSnapshotStorageKinds(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	for _, kind := range []string{"growable-file", "preallocated-file", "directory", "block-device", "ranges-appended"} {
		t.Run(kind, func(t *testing.T) {
			_, dev := d.attach(64 << 20)
			fillRandom(t, dev, 0, 64<<20)
			before := deviceMD5(t, dev)
			dir := t.TempDir()
			var storage string
			switch kind {
			case "growable-file":
				storage = filepath.Join(dir, "diff.img")
			case "preallocated-file":
				storage = filepath.Join(dir, "diff.img")
				run(t, "fallocate", "-l", "80M", storage)
			case "directory":
				storage = dir
			case "block-device", "ranges-appended":
				storage = loopDevice(t, tempFile(t, 80<<20))
			}
			limit := "80MiB"
			id := d.cli("snapshot", "create", "--device", dev, "--storage", storage, "--limit", limit)
			image := strings.Fields(d.cli("snapshot", "take", "--id", id))[1]
			if kind == "ranges-appended" {
				extra := tempFile(t, 64<<20)
				run(t, "fallocate", "-l", "64M", extra)
				d.cli("snapshot", "append-storage", "--id", id, "--storage", extra, "--ranges", "0:65536", "--ranges", "65536:65536")
			}
			fillRandom(t, dev, 0, 64<<20)
			if got := deviceMD5(t, image); got != before {
				t.Fatalf("image md5 %s, want %s (the device before the take)", got, before)
			}
			var info struct {
				State     string `json:"state"`
				ErrorCode int    `json:"error_code"`
			}
			d.cliJSON(&info, "snapshot", "info", "--device", dev)
			if info.ErrorCode != 0 || info.State != "taken" {
				t.Fatalf("snapshot info: %+v, want taken without error", info)
			}
			d.cli("snapshot", "destroy", "--id", id)
			if kind == "directory" {
				if left, _ := os.ReadDir(dir); len(left) != 0 {
					t.Fatalf("directory storage left %d files behind", len(left))
				}
			}
		})
	}
}

func TestSnapshotOverflow(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	_, dev := d.attach(128 << 20)
	fillRandom(t, dev, 0, 128<<20)
	id := d.cli("snapshot", "create", "--device", dev, "--storage", t.TempDir(), "--limit", "16MiB")
	image := strings.Fields(d.cli("snapshot", "take", "--id", id))[1]
	fillRandom(t, dev, 0, 128<<20)
	after := deviceMD5(t, dev)

	var ev struct {
		Code  string `json:"code"`
		Errno int    `json:"errno"`
	}
	deadline := time.Now().Add(30 * time.Second)
	for ev.Code != "corrupted" && time.Now().Before(deadline) {
		d.cliJSON(&ev, "snapshot", "wait-event", "--id", id, "--timeout", "1s")
	}
	if ev.Code != "corrupted" || ev.Errno != int(unix.ENOSPC) {
		t.Fatalf("event %+v, want corrupted with ENOSPC (%d)", ev, unix.ENOSPC)
	}
	if _, err := deviceMD5Err(image); err == nil || !errors.Is(err, unix.EIO) {
		t.Fatalf("reading the overflowed image: %v, want EIO", err)
	}
	info := d.cli("snapshot", "info", "--device", dev)
	if !strings.Contains(info, fmt.Sprintf("error_code=-%d", unix.ENOSPC)) {
		t.Fatalf("snapshot info after overflow:\n%s\nwant error_code=-%d", info, unix.ENOSPC)
	}
	if deviceMD5(t, dev) != after {
		t.Fatal("the original changed after its writes completed")
	}
}

func TestSnapshotWatchGrowDir(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	_, dev := d.attach(128 << 20)
	fillRandom(t, dev, 0, 128<<20)
	before := deviceMD5(t, dev)
	growDir := t.TempDir()
	id := d.cli("snapshot", "create", "--device", dev, "--storage", filepath.Join(t.TempDir(), "first.img"), "--limit", "8MiB")
	image := strings.Fields(d.cli("snapshot", "take", "--id", id))[1]

	var watchOut bytes.Buffer
	watch := exec.Command(d.bin, "--socket", d.socket, "snapshot", "watch", "--id", id, "--grow-dir", growDir, "--grow-limit", "256MiB")
	watch.Stdout, watch.Stderr = &watchOut, &watchOut
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	defer watch.Process.Kill()
	// Write in steps smaller than one growth step (diff_storage_minimum,
	// 8 MiB here), giving the watcher time to answer each low_free_space.
	for off := int64(0); off < 128<<20; off += 2 << 20 {
		fillRandom(t, dev, off, 2<<20)
		time.Sleep(200 * time.Millisecond)
	}
	if got, err := deviceMD5Err(image); err != nil || got != before {
		t.Fatalf("image md5 %s, %v; want %s; watch printed:\n%s", got, err, before, watchOut.String())
	}
	files, _ := os.ReadDir(growDir)
	if len(files) < 2 {
		t.Fatalf("watch added %d storage files, want several growth steps; it printed:\n%s", len(files), watchOut.String())
	}
	d.cli("snapshot", "destroy", "--id", id)
	watch.Wait()
	if strings.Contains(watchOut.String(), "corrupted") {
		t.Fatalf("the snapshot was corrupted despite watch --grow-dir:\n%s", watchOut.String())
	}
}

func TestSnapshotLifecycle(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	_, dev := d.attach(64 << 20)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	load := exec.CommandContext(ctx, "fio", "--name=load", "--filename="+dev, "--rw=randwrite", "--bs=64k",
		"--ioengine=io_uring", "--iodepth=4", "--direct=1", "--time_based", "--runtime=600")
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 20; i++ {
		id, images := d.snapshot(t.TempDir(), "64MiB", dev)
		if _, err := deviceMD5Err(images[0]); err != nil {
			t.Fatalf("cycle %d: read image: %v", i, err)
		}
		d.cli("snapshot", "destroy", "--id", id)
	}
	// SIGINT lets fio reap its in-flight writes before it exits; a killed
	// fio's O_DIRECT writes may land after it is gone, over the mkfs below.
	load.Process.Signal(syscall.SIGINT)
	load.Wait()

	// Destroy refuses while the image is mounted, and works after umount.
	mkfsMount(t, dev) // a filesystem to mount on the image
	id, images := d.snapshot(t.TempDir(), "64MiB", dev)
	img := mountRO(t, images[0])
	if _, errOut, err := d.try("snapshot", "destroy", "--id", id); exitCode(err) != 1 || !strings.Contains(errOut, "open") {
		t.Fatalf("destroy with a mounted image: exit %d, %q; want exit 1 saying the image is open", exitCode(err), errOut)
	}
	run(t, "umount", img)
	d.cli("snapshot", "destroy", "--id", id)
	if ids := d.cli("snapshot", "collect"); ids != "" {
		t.Fatalf("snapshots left after destroy: %q", ids)
	}
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}

func TestSnapshotBadInput(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	_, dev := d.attach(64 << 20)
	_, dev2 := d.attach(64 << 20)
	storageDev := loopDevice(t, tempFile(t, 64<<20))
	id := d.cli("snapshot", "create", "--device", dev, "--storage", t.TempDir(), "--limit", "64MiB")
	unknownID := "0b0c3f53-5a47-4a50-8e0e-3e6bd0e3bd1a"
	for _, tc := range []struct {
		args []string
		code int
		msg  string
	}{
		{[]string{"snapshot", "take", "--id", "nope"}, 2, "not a snapshot UUID"},
		{[]string{"snapshot", "create", "--storage", "/tmp", "--limit", "many"}, 2, "not a size"},
		{[]string{"attach"}, 2, "needs --backing"},
		{[]string{"snapshot", "take", "--id", unknownID}, 1, "not found"},
		{[]string{"snapshot", "create", "--device", "/dev/ublkb99", "--storage", "/tmp", "--limit", "64MiB"}, 1, "unknown device"},
		{[]string{"snapshot", "create", "--device", dev2, "--storage", "/no/such/dir/file", "--limit", "64MiB"}, 1, "/no/such/dir"},
		{[]string{"snapshot", "create", "--device", dev2, "--storage", "/tmp", "--limit", "1KiB"}, 1, "limit"},
		{[]string{"snapshot", "create", "--device", dev2, "--storage", "/proc", "--limit", "64MiB"}, 1, "cannot hold"},
		{[]string{"snapshot", "add", "--id", id, "--device", dev}, 1, "already"},
		{[]string{"snapshot", "create", "--device", dev, "--storage", "/tmp", "--limit", "64MiB"}, 1, "in snapshot"},
		{[]string{"snapshot", "append-storage", "--id", id, "--storage", storageDev, "--ranges", "131072:8"}, 1, "outside"},
		{[]string{"attach", "--backing", "/no/such/file"}, 1, "/no/such/file"},
		{[]string{"snapshot", "create", "--device", dev2, "--storage", dev2, "--limit", "64MiB"}, 1, "difference storage"},
		{[]string{"detach", "--device", dev}, 1, "snapshot"},
	} {
		_, errOut, err := d.try(tc.args...)
		if exitCode(err) != tc.code || !strings.Contains(errOut, tc.msg) {
			t.Errorf("ublksnap %q: exit %d, stderr %q; want exit %d and %q", tc.args, exitCode(err), errOut, tc.code, tc.msg)
		}
	}
	// Nothing changed: dev2 is in no snapshot, dev still in its own.
	if info := d.cli("snapshot", "info", "--device", dev2); !strings.Contains(info, "snapshot=\n") {
		t.Errorf("after the refused requests dev2 shows\n%s\nwant it in no snapshot", info)
	}
	if info := d.cli("snapshot", "info", "--device", dev); !strings.Contains(info, "snapshot="+id) {
		t.Errorf("after the refused requests dev shows\n%s\nwant it in %s", info, id)
	}
	id2 := d.cli("snapshot", "create", "--storage", t.TempDir(), "--limit", "64MiB")
	if _, errOut, err := d.try("snapshot", "take", "--id", id2); exitCode(err) != 1 || !strings.Contains(errOut, "no devices") {
		t.Errorf("take with no devices: exit %d %q, want 1 and 'no devices'", exitCode(err), errOut)
	}
	d.cli("snapshot", "take", "--id", id)
	if _, errOut, err := d.try("snapshot", "take", "--id", id); exitCode(err) != 1 || !strings.Contains(errOut, "already taken") {
		t.Errorf("second take: exit %d %q, want 1 and 'already taken'", exitCode(err), errOut)
	}
	// A second daemon on the same socket is refused.
	out, err := exec.Command(d.bin, "daemon", "--socket", d.socket).CombinedOutput()
	if exitCode(err) != 1 || !strings.Contains(string(out), "already running") {
		t.Errorf("second daemon: exit %d %q, want 1 and 'already running'", exitCode(err), out)
	}
	d.cli("snapshot", "destroy", "--id", id)
	d.cli("snapshot", "destroy", "--id", id2)
}
