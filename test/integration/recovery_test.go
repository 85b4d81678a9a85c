//go:build vmtest

package integration

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// crash kills the daemon's serving process (the re-executed child that
// holds the devices) with SIGKILL, as a crash would, and reaps the daemon.
func (d *daemon) crash() {
	d.t.Helper()
	// The child was forked by one of the daemon's threads, not
	// necessarily its main one.
	pid := d.cmd.Process.Pid
	files, _ := filepath.Glob("/proc/" + strconv.Itoa(pid) + "/task/*/children")
	var kids []string
	for _, f := range files {
		b, _ := os.ReadFile(f)
		kids = append(kids, strings.Fields(string(b))...)
	}
	if len(kids) != 1 {
		d.t.Fatalf("children of the daemon %d: %q", pid, kids)
	}
	child, _ := strconv.Atoi(kids[0])
	if err := syscall.Kill(child, syscall.SIGKILL); err != nil {
		d.t.Fatal(err)
	}
	d.cmd.Wait() // exits with the child's status
}

// TestDaemonCrashRecovery kills the daemon under fio writing through ext4
// on a filtered device: the device stays, its I/O waits, a new daemon
// recovers it, fio finishes with its data verified, fsck is clean. A held
// snapshot is lost with its image; a ublk device that is not ours is left
// alone.
func TestDaemonCrashRecovery(t *testing.T) {
	d := startDaemon(t)
	_, dev := d.attach(384 << 20)
	dir := mkfsMount(t, dev)
	_, images := d.snapshot(t.TempDir(), "256MiB", dev)

	// Someone else's ublk device, served by `dev serve` (no daemon).
	foreign := exec.Command(d.bin, "dev", "serve", "--backing", tempFile(t, 16<<20))
	out, err := foreign.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := foreign.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { foreign.Process.Signal(syscall.SIGTERM); foreign.Wait() })
	line := make([]byte, 64)
	n, _ := out.Read(line)
	foreignDev := strings.TrimSpace(string(line[:n]))
	if !strings.HasPrefix(foreignDev, "/dev/ublkb") {
		t.Fatalf("dev serve printed %q", foreignDev)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	fioCmd := exec.CommandContext(ctx, "fio", "--name=crash", "--filename="+filepath.Join(dir, "f"),
		"--size=192M", "--rw=randwrite", "--bs=4k", "--ioengine=libaio", "--iodepth=16", "--direct=1",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--output-format=terse", "--terse-version=3")
	fioOut := &strings.Builder{}
	fioCmd.Stdout, fioCmd.Stderr = fioOut, fioOut
	if err := fioCmd.Start(); err != nil {
		t.Fatal(err)
	}
	fioDone := make(chan error, 1)
	go func() { fioDone <- fioCmd.Wait() }()
	time.Sleep(4 * time.Second)
	select {
	case err := <-fioDone:
		t.Fatalf("fio ended (%v) before the crash; make it longer:\n%s", err, fioOut)
	default:
	}

	killed := time.Now()
	d.crash()
	if _, err := os.Stat(dev); err != nil {
		t.Fatalf("the filtered device went away with the daemon: %v", err)
	}
	// A read issued while no daemon lives waits for the next one.
	paused := make(chan time.Duration, 1)
	go func() {
		runErr("dd", "if="+dev, "of=/dev/null", "bs=4k", "count=1", "iflag=direct")
		paused <- time.Since(killed)
	}()
	time.Sleep(time.Second)
	select {
	case <-paused:
		t.Fatal("a read of the filtered device completed while no daemon was running")
	default:
	}

	d2 := startDaemonOn(t, d.socket)
	var pause time.Duration
	select {
	case pause = <-paused:
	case <-time.After(2 * time.Minute):
		t.Fatalf("the held read did not complete after the restart; daemon log:\n%s", d2.log)
	}
	t.Logf("I/O paused for %v from the kill (the restart began after 1s of it)", pause.Round(time.Millisecond))

	select {
	case err := <-fioDone:
		if err != nil {
			t.Fatalf("fio across the crash: %v\n%s\ndaemon log:\n%s", err, fioOut, d2.log)
		}
	case <-ctx.Done():
		t.Fatalf("fio did not finish after the restart; daemon log:\n%s", d2.log)
	}
	if f := strings.Split(strings.TrimSpace(fioOut.String()), ";"); len(f) < 5 || f[4] != "0" {
		t.Fatalf("fio reported errors across the crash:\n%s", fioOut)
	}

	var st struct {
		Devices   []struct{ Path string }
		Snapshots []struct{ ID string }
	}
	d2.cliJSON(&st, "status")
	if len(st.Devices) != 1 || st.Devices[0].Path != dev || len(st.Snapshots) != 0 {
		t.Errorf("status after the restart: %+v; want %s and no snapshot", st, dev)
	}
	if _, err := os.Stat(images[0]); err == nil {
		t.Errorf("the image %s of the crashed daemon is still there", images[0])
	}
	if _, err := os.Stat(foreignDev); err != nil {
		t.Errorf("the restart removed someone else's device %s: %v", foreignDev, err)
	}

	run(t, "umount", dir)
	run(t, "fsck.ext4", "-fn", dev)
	d2.cli("detach", "--device", dev)
	foreign.Process.Signal(syscall.SIGTERM)
	foreign.Wait()
}
