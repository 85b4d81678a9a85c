//go:build vmtest

package integration

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// The tests of this file check the defects fixed when the snapshot core
// became its own package (issue #8), each through the CLI and the daemon.

// Detach refuses while the device is mounted or open, and says
// who holds it.
func TestDetachRefusesMountedDevice(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	_, dev := d.attach(64 << 20)
	dir := mkfsMount(t, dev)
	writeSums(t, dir, writeTree(t, dir, 10))
	_, errOut, err := d.try("detach", "--device", dev)
	if exitCode(err) != 1 || !strings.Contains(errOut, "mounted on "+dir) {
		t.Fatalf("detach of a mounted device: exit %d, %q; want exit 1 naming the mount %s", exitCode(err), errOut, dir)
	}
	// The filesystem still works.
	writeSums(t, dir, writeTree(t, dir, 12))
	checkSumsFile(t, dir)
	run(t, "umount", dir)

	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	_, errOut, err = d.try("detach", "--device", dev)
	if exitCode(err) != 1 || !strings.Contains(errOut, fmt.Sprintf("open by pid %d", os.Getpid())) {
		t.Errorf("detach of an open device: exit %d, %q; want exit 1 naming pid %d", exitCode(err), errOut, os.Getpid())
	}
	f.Close()
	d.cli("detach", "--device", dev)
	if _, err := os.Stat(dev); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("%s still exists after detach: %v", dev, err)
	}
	// --force detaches an open device.
	_, dev2 := d.attach(16 << 20)
	f2, err := os.Open(dev2)
	if err != nil {
		t.Fatal(err)
	}
	defer f2.Close()
	d.cli("detach", "--device", dev2, "--force")
}

// devNumbers returns the major and minor numbers of a block device.
func devNumbers(t testing.TB, dev string) (uint32, uint32) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(dev, &st); err != nil {
		t.Fatal(err)
	}
	return unix.Major(st.Rdev), unix.Minor(st.Rdev)
}

// The difference storage (or a backing) on a filtered device,
// through a filesystem on it or another node of it, is refused.
func TestStorageNeverOnAFilteredDevice(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	_, devA := d.attach(64 << 20)
	_, devB := d.attach(64 << 20)
	dir := mkfsMount(t, devA)
	major, minor := devNumbers(t, devA)
	alias := filepath.Join(t.TempDir(), "alias")
	if err := unix.Mknod(alias, unix.S_IFBLK|0o600, int(unix.Mkdev(major, minor))); err != nil {
		t.Fatal(err)
	}
	inFS := filepath.Join(dir, "file.img")
	if err := os.WriteFile(inFS, make([]byte, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args []string
		msg  string
	}{
		{[]string{"snapshot", "create", "--device", devB, "--storage", filepath.Join(dir, "diff"), "--limit", "32MiB"}, "filtered device " + devA},
		{[]string{"snapshot", "create", "--device", devB, "--storage", dir, "--limit", "32MiB"}, "filtered device " + devA},
		{[]string{"snapshot", "create", "--device", devB, "--storage", alias, "--limit", "32MiB"}, "filtered device " + devA},
		{[]string{"attach", "--backing", inFS}, "filtered device " + devA},
		{[]string{"attach", "--backing", alias}, "filtered device " + devA},
	} {
		_, errOut, err := d.try(tc.args...)
		if exitCode(err) != 1 || !strings.Contains(errOut, tc.msg) {
			t.Errorf("ublksnap %q: exit %d, %q; want exit 1 and %q", tc.args, exitCode(err), errOut, tc.msg)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "diff")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("a refused create left a file on the filtered device: %v", err)
	}
	id := d.cli("snapshot", "create", "--device", devB, "--storage", t.TempDir(), "--limit", "32MiB")
	if _, errOut, err := d.try("snapshot", "append-storage", "--id", id, "--storage", inFS); exitCode(err) != 1 || !strings.Contains(errOut, "filtered device "+devA) {
		t.Errorf("append-storage of a file on a filtered device: exit %d, %q", exitCode(err), errOut)
	}
	d.cli("snapshot", "destroy", "--id", id)
}

// Every thread of the daemon is an I/O flusher, not only the
// queue threads.
func TestDaemonThreadsAreIOFlushers(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	_, dev := d.attach(64 << 20)
	id, _ := d.snapshot(t.TempDir(), "64MiB", dev)
	fillRandom(t, dev, 0, 16<<20) // COW goroutines and the store worker run
	// The re-executed daemon is the child of one of the parent's threads.
	lists, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", d.cmd.Process.Pid))
	var pid string
	for _, l := range lists {
		if b, err := os.ReadFile(l); err == nil && strings.TrimSpace(string(b)) != "" {
			pid = strings.Fields(string(b))[0]
		}
	}
	if pid == "" {
		t.Fatal("the daemon has no re-executed child")
	}
	tasks, err := filepath.Glob("/proc/" + pid + "/task/*/stat")
	if err != nil || len(tasks) < 4 {
		t.Fatalf("threads of the daemon: %v %v", tasks, err)
	}
	const pfMemallocNoIO = 0x00080000 // PR_SET_IO_FLUSHER sets PF_MEMALLOC_NOIO | PF_LOCAL_THROTTLE
	for _, task := range tasks {
		stat, err := os.ReadFile(task)
		if err != nil {
			continue // the thread ended
		}
		// pid (comm) state ppid pgrp session tty_nr tpgid flags ...
		fields := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		flags, err := strconv.ParseUint(fields[6], 10, 64)
		if err != nil {
			t.Fatalf("%s: flags %q: %v", task, fields[6], err)
		}
		if flags&pfMemallocNoIO == 0 {
			t.Errorf("thread %s is not an I/O flusher (flags %#x)", task, flags)
		}
	}
	t.Logf("%d threads checked", len(tasks))
	d.cli("snapshot", "destroy", "--id", id)
}

// A filesystem mounted after the daemon started is where the
// user's paths on it lead, not the directory underneath.
func TestPathsOnFilesystemMountedLater(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	_, dev := d.attach(64 << 20)
	scratch := loopDevice(t, tempFile(t, 128<<20))
	mnt := t.TempDir()
	run(t, "mkfs.ext4", "-q", "-F", scratch)
	run(t, "mount", scratch, mnt) // after the daemon started
	t.Cleanup(func() { runErr("umount", mnt) })
	backing := filepath.Join(mnt, "backing.img")
	if err := os.WriteFile(backing, make([]byte, 16<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	dev2 := d.cli("attach", "--backing", backing)
	storage := filepath.Join(mnt, "diff")
	id, images := d.snapshot(storage, "64MiB", dev)
	if fi, err := os.Stat(storage); err != nil {
		t.Fatalf("the storage file is not on the filesystem mounted at %s: %v", mnt, err)
	} else {
		t.Logf("storage file on the later mount: %d bytes", fi.Size())
	}
	before := deviceMD5(t, images[0])
	fillRandom(t, dev, 0, 32<<20)
	if deviceMD5(t, images[0]) != before {
		t.Fatal("image changed")
	}
	d.cli("snapshot", "destroy", "--id", id)
	d.cli("detach", "--device", dev2)
	if _, err := os.Stat(storage); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the storage file the daemon created survived destroy: %v", err)
	}
	run(t, "umount", mnt)
	if left, _ := os.ReadDir(mnt); len(left) != 0 {
		t.Errorf("files were written under the mount point: %v", left)
	}
}

// The socket is 0600 from its creation; a waiter on a destroyed
// snapshot is told at once; an existing file with data is not overwritten
// unless forced; append-storage after destroy is a clean error.
func TestDestroyedSnapshotAndStorageSafety(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	if fi, err := os.Stat(d.socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket %s: %v %v, want mode 0600", d.socket, fi.Mode(), err)
	}
	_, dev := d.attach(64 << 20)
	precious := filepath.Join(t.TempDir(), "precious")
	if err := os.WriteFile(precious, []byte("a user's data\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, errOut, err := d.try("snapshot", "create", "--device", dev, "--storage", precious, "--limit", "64MiB")
	if exitCode(err) != 1 || !strings.Contains(errOut, "--force") {
		t.Errorf("create over a file with data: exit %d, %q; want 1 and a hint at --force", exitCode(err), errOut)
	}
	if got, _ := os.ReadFile(precious); string(got) != "a user's data\n" {
		t.Errorf("the file was changed: %q", got)
	}
	id, _ := d.snapshot(t.TempDir(), "64MiB", dev)
	waited := make(chan error, 1)
	start := time.Now()
	go func() {
		_, _, err := d.try("snapshot", "wait-event", "--id", id, "--timeout", "10m")
		waited <- err
	}()
	time.Sleep(time.Second) // let it wait
	d.cli("snapshot", "destroy", "--id", id)
	select {
	case err := <-waited:
		if exitCode(err) != 1 {
			t.Errorf("wait-event on a destroyed snapshot: %v, want exit 1", err)
		}
		t.Logf("the waiter returned %v after the destroy", time.Since(start))
	case <-time.After(30 * time.Second):
		t.Fatal("wait-event still sleeps 30s after its snapshot was destroyed")
	}
	extra := tempFile(t, 16<<20)
	if _, errOut, err := d.try("snapshot", "append-storage", "--id", id, "--storage", extra); exitCode(err) != 1 || !strings.Contains(errOut, "not found") {
		t.Errorf("append-storage after destroy: exit %d, %q; want 1 and not found", exitCode(err), errOut)
	}
	d.cli("status") // the daemon still serves
}

// ublksnap watch --grow-dir run for two snapshots, one after the other,
// in one directory: the second never collides with the first's names (and
// overflows), and each watch removes its files when its snapshot ends.
func TestWatchGrowDirTwice(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	_, dev := d.attach(64 << 20)
	growDir := t.TempDir()
	for round := 1; round <= 2; round++ {
		fillRandom(t, dev, 0, 64<<20)
		before := deviceMD5(t, dev)
		id, images := d.snapshot(filepath.Join(t.TempDir(), "first.img"), "8MiB", dev)
		var out bytes.Buffer
		watch := exec.Command(d.bin, "--socket", d.socket, "snapshot", "watch", "--id", id, "--grow-dir", growDir, "--grow-limit", "128MiB")
		watch.Stdout, watch.Stderr = &out, &out
		if err := watch.Start(); err != nil {
			t.Fatal(err)
		}
		for off := int64(0); off < 64<<20; off += 2 << 20 {
			d.waitStorageRoom(t, id, 4<<20) // the step and room to spare
			fillRandom(t, dev, off, 2<<20)
		}
		if got, err := deviceMD5Err(images[0]); err != nil || got != before {
			t.Fatalf("round %d: image md5 %s, %v; want %s; watch printed:\n%s", round, got, err, before, out.String())
		}
		if files, _ := os.ReadDir(growDir); len(files) < 2 {
			t.Fatalf("round %d: %d storage files, want several; watch printed:\n%s", round, len(files), out.String())
		}
		d.cli("snapshot", "destroy", "--id", id)
		done := make(chan error, 1)
		go func() { done <- watch.Wait() }()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("round %d: watch: %v\n%s", round, err, out.String())
			}
		case <-time.After(30 * time.Second):
			watch.Process.Kill()
			t.Fatalf("round %d: watch did not end after its snapshot was destroyed", round)
		}
		if strings.Contains(out.String(), "corrupted") {
			t.Fatalf("round %d: the snapshot overflowed:\n%s", round, out.String())
		}
		if files, _ := os.ReadDir(growDir); len(files) != 0 {
			t.Fatalf("round %d: watch left %d files in %s", round, len(files), growDir)
		}
	}
}

// Through the CLI: a block device as storage is used
// up to min(capacity, limit) and asks for more before it is full; a storage
// file larger than the limit is used as it is; overlapping or overflowing
// sector ranges are refused.
func TestStorageSizesAndRanges(t *testing.T) {
	// A 16 MiB step: low_free_space at 8 MiB free, with room for the 4 MiB
	// of chunks that may wait in memory before they are stored.
	d := startDaemon(t, "--diff-storage-minimum", "16MiB")
	_, dev := d.attach(64 << 20)
	waitFor := func(id, code string) bool {
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			var ev struct {
				Code string `json:"code"`
			}
			d.cliJSON(&ev, "snapshot", "wait-event", "--id", id, "--timeout", "1s")
			if ev.Code == code {
				return true
			}
			if ev.Code == "corrupted" {
				t.Fatalf("snapshot %s corrupted while waiting for %s", id, code)
			}
		}
		return false
	}
	state := func() (string, int) {
		var info struct {
			State     string `json:"state"`
			ErrorCode int    `json:"error_code"`
		}
		d.cliJSON(&info, "snapshot", "info", "--device", dev)
		return info.State, info.ErrorCode
	}

	// A 32 MiB disk with a limit of 1 GiB: 29 MiB of changes fit, and
	// low_free_space comes before the disk is full.
	disk := loopDevice(t, tempFile(t, 32<<20))
	fillRandom(t, dev, 0, 64<<20)
	before := deviceMD5(t, dev)
	id, images := d.snapshot(disk, "1GiB", dev)
	fillRandom(t, dev, 0, 29<<20) // at least 25 MiB stored: below the 8 MiB low-water mark
	if !waitFor(id, "low_free_space") {
		t.Error("no low_free_space from a block device storage filling up")
	}
	if st, code := state(); st != "taken" || code != 0 {
		t.Fatalf("block device storage: state %s error %d", st, code)
	}
	if deviceMD5(t, images[0]) != before {
		t.Fatal("image changed")
	}
	// Overlapping ranges and ranges that overflow are refused.
	extra := tempFile(t, 16<<20)
	for _, ranges := range [][]string{
		{"0:8192", "4096:8192"},
		{"4611686018427387904:4611686018427387904"},
	} {
		args := []string{"snapshot", "append-storage", "--id", id, "--storage", extra}
		for _, r := range ranges {
			args = append(args, "--ranges", r)
		}
		if _, errOut, err := d.try(args...); exitCode(err) != 1 {
			t.Errorf("append-storage --ranges %v: exit %d %q, want 1", ranges, exitCode(err), errOut)
		}
	}
	d.cli("snapshot", "append-storage", "--id", id, "--storage", extra, "--ranges", "0:16384")
	if _, errOut, err := d.try("snapshot", "append-storage", "--id", id, "--storage", extra, "--ranges", "8192:8192"); exitCode(err) != 1 || !strings.Contains(errOut, "overlaps") {
		t.Errorf("append-storage of sectors already in the storage: exit %d %q, want 1 and overlaps", exitCode(err), errOut)
	}
	d.cli("snapshot", "destroy", "--id", id)

	// A 64 MiB preallocated file with a 16 MiB limit is used whole.
	file := filepath.Join(t.TempDir(), "diff.img")
	run(t, "fallocate", "-l", "64M", file)
	before = deviceMD5(t, dev)
	id, images = d.snapshot(file, "16MiB", dev)
	fillRandom(t, dev, 0, 48<<20)
	if st, code := state(); st != "taken" || code != 0 {
		t.Fatalf("storage file larger than its limit: state %s error %d", st, code)
	}
	if deviceMD5(t, images[0]) != before {
		t.Fatal("image changed")
	}
	d.cli("snapshot", "destroy", "--id", id)
	if fi, err := os.Stat(file); err != nil || fi.Size() != 64<<20 {
		t.Errorf("the user's storage file after destroy: %v, %v", fi, err)
	}
}
