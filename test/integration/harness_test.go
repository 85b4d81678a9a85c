//go:build vmtest

// Package integration holds the tests that need a real ublk kernel. They are
// compiled on the host (go test -c -tags vmtest) and run as root inside the
// VM that test/vm/run boots, where ublk_drv, loop, ext4 and dm-* are loaded
// and /tmp is tmpfs. Nothing here skips: a test that cannot reach what it
// needs fails and says why.
package integration

import (
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

func TestMain(m *testing.M) {
	if os.Getuid() != 0 {
		fmt.Fprintln(os.Stderr, "integration tests need root inside the ublk VM: run them with `make test-vm`")
		os.Exit(2)
	}
	if _, err := os.Stat("/dev/ublk-control"); err != nil {
		fmt.Fprintf(os.Stderr, "no ublk in this kernel (%v): run the tests with `make test-vm`\n", err)
		os.Exit(2)
	}
	os.Exit(m.Run())
}

// run runs a command and fails the test with its output if it fails.
func run(t testing.TB, name string, args ...string) string {
	t.Helper()
	out, err := runErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

// runErr runs a command with a 10-minute limit and returns its combined output.
func runErr(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	var buf bytes.Buffer
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Stdout, cmd.Stderr = &buf, &buf
	err := cmd.Run()
	return buf.String(), err
}

// tempFile creates a sparse file of size bytes on the guest's tmpfs.
func tempFile(t testing.TB, size int64) string {
	t.Helper()
	f, err := os.CreateTemp(t.TempDir(), "backing-*.img")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return f.Name()
}

// loopDevice attaches file to a free loop device, detached at cleanup.
func loopDevice(t testing.TB, file string) string {
	t.Helper()
	dev := strings.TrimSpace(run(t, "losetup", "--find", "--show", "--direct-io=on", file))
	t.Cleanup(func() { runErr("losetup", "-d", dev) })
	return dev
}

// mkfsMount makes an ext4 filesystem on dev and mounts it on a temporary
// directory; the mount is undone at cleanup if the test has not done so.
func mkfsMount(t testing.TB, dev string) string {
	t.Helper()
	run(t, "mkfs.ext4", "-q", "-F", dev)
	dir := t.TempDir()
	run(t, "mount", dev, dir)
	t.Cleanup(func() { runErr("umount", dir) })
	return dir
}

// writeTree writes n files of varied sizes under dir and returns their
// md5sum listing (relative paths), as md5sum -c accepts it.
func writeTree(t testing.TB, dir string, n int) string {
	t.Helper()
	var names []string
	for i := 0; i < n; i++ {
		sub := filepath.Join(dir, fmt.Sprintf("d%02d", i%7))
		if err := os.MkdirAll(sub, 0o755); err != nil {
			t.Fatal(err)
		}
		name := filepath.Join(sub, fmt.Sprintf("f%04d", i))
		data := bytes.Repeat([]byte(fmt.Sprintf("file %d of the tree;", i)), 1+(i*977)%9000)
		if err := os.WriteFile(name, data, 0o644); err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(dir, name)
		names = append(names, rel)
	}
	cmd := exec.Command("md5sum", names...)
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("md5sum: %v", err)
	}
	return string(out)
}

// checkTree verifies an md5sum listing from writeTree against dir.
func checkTree(t testing.TB, dir, sums string) {
	t.Helper()
	cmd := exec.Command("md5sum", "--quiet", "-c", "-")
	cmd.Dir = dir
	cmd.Stdin = strings.NewReader(sums)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("md5sum -c in %s: %v\n%s", dir, err, out)
	}
}

// fio runs fio with the given job options and fails the test if it fails.
func fio(t testing.TB, args ...string) string {
	t.Helper()
	return run(t, "fio", append([]string{"--output-format=terse", "--terse-version=3"}, args...)...)
}

func TestHarnessUblkControl(t *testing.T) {
	fi, err := os.Stat("/dev/ublk-control")
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode()&os.ModeCharDevice == 0 {
		t.Fatalf("/dev/ublk-control is %v, want a character device", fi.Mode())
	}
}

func TestHarnessLoopExt4Fsck(t *testing.T) {
	dev := loopDevice(t, tempFile(t, 64<<20))
	dir := mkfsMount(t, dev)
	sums := writeTree(t, dir, 40)
	run(t, "umount", dir)
	run(t, "fsck.ext4", "-fn", dev)
	run(t, "mount", "-o", "ro", dev, dir)
	checkTree(t, dir, sums)
	run(t, "umount", dir)
}

func TestHarnessFio(t *testing.T) {
	file := tempFile(t, 32<<20)
	out := fio(t, "--name=harness", "--filename="+file, "--size=16M", "--rw=randwrite",
		"--bs=4k", "--ioengine=io_uring", "--iodepth=8", "--verify=crc32c", "--do_verify=1")
	if !strings.Contains(out, "harness") {
		t.Fatalf("fio printed no result line:\n%s", out)
	}
}

// testRand returns a random source for the choices of a test, seeded from
// UBLKSNAP_SEED or else the clock, and logs the seed so that a failure can
// be replayed with UBLKSNAP_SEED=seed.
func testRand(t testing.TB, stream uint64) *rand.Rand {
	t.Helper()
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("UBLKSNAP_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("UBLKSNAP_SEED=%q: want an unsigned integer", s)
		}
		seed = v
	}
	t.Logf("random seed %d (replay with UBLKSNAP_SEED=%d)", seed, seed)
	return rand.New(rand.NewPCG(seed, stream))
}
