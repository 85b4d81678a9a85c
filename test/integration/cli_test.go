//go:build vmtest

package integration

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The tests of this file check the CLI's side of issue #8: the daemon's
// blksnap parameters as human sizes (defect 13) and the files of
// snapshot watch --grow-dir (defect 10).

// The daemon's size parameters take units, and a bare number is bytes:
// a new storage file starts at one diff_storage_minimum. A bad value ends
// the daemon at once with exit 2, naming the flag.
func TestCLIDaemonParameterSizes(t *testing.T) {
	for _, tc := range []struct {
		value string
		want  uint64 // bytes
	}{
		{"64MiB", 64 << 20},
		{"33554432", 32 << 20},
	} {
		d := startDaemon(t, "--diff-storage-minimum", tc.value)
		id := d.cli("snapshot", "create", "--storage", filepath.Join(t.TempDir(), "diff.img"), "--limit", "1GiB")
		var s struct {
			Storage struct {
				Capacity uint64 `json:"capacity"`
			} `json:"storage"`
		}
		d.cliJSON(&s, "snapshot", "add", "--id", id, "--device", d.cli("attach", "--backing", tempFile(t, 16<<20)))
		if s.Storage.Capacity != tc.want {
			t.Errorf("--diff-storage-minimum %s: a new storage file of %d bytes, want %d", tc.value, s.Storage.Capacity, tc.want)
		}
		d.cli("snapshot", "destroy", "--id", id)
		d.stop()
	}

	bin := ublksnapBin(t)
	for _, bad := range [][]string{
		{"--diff-storage-minimum", "lots"},
		{"--diff-storage-minimum", "128KiB"}, // less than two 256 KiB chunks
		{"--diff-buffer-memory-limit", "-1"},
		{"--chunk-minimum-shift", "1.5"},
		{"--chunk-maximum-shift", "31"},
	} {
		socket := filepath.Join(t.TempDir(), "ublksnap.sock")
		var stderr bytes.Buffer
		cmd := exec.Command(bin, append([]string{"daemon", "--socket", socket}, bad...)...)
		cmd.Stderr = &stderr
		done := make(chan error, 1)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() { done <- cmd.Wait() }()
		select {
		case err := <-done:
			if exitCode(err) != 2 || !strings.Contains(stderr.String(), bad[0]) {
				t.Errorf("daemon %q: exit %d, %q; want exit 2 naming %s", bad, exitCode(err), stderr.String(), bad[0])
			}
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			t.Fatalf("daemon %q is running; want it refused", bad)
		}
		if _, err := os.Stat(socket); err == nil {
			t.Errorf("daemon %q made its socket", bad)
		}
	}
}

// A watch skips a name in --grow-dir that is taken (here by a file of the
// user's), the snapshot does not overflow, and when it is destroyed the
// watch removes the files it made and only those.
func TestCLIWatchSkipsTakenNames(t *testing.T) {
	d := startDaemon(t, smallStorage...)
	_, dev := d.attach(64 << 20)
	fillRandom(t, dev, 0, 64<<20)
	before := deviceMD5(t, dev)
	id, images := d.snapshot(filepath.Join(t.TempDir(), "first.img"), "8MiB", dev)
	growDir := t.TempDir()
	mine := filepath.Join(growDir, "ublksnap-"+id+"-1.diff")
	if err := os.WriteFile(mine, []byte("the user's\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	var out bytes.Buffer
	watch := exec.Command(d.bin, "--socket", d.socket, "snapshot", "watch", "--id", id, "--grow-dir", growDir, "--grow-limit", "128MiB")
	watch.Stdout, watch.Stderr = &out, &out
	if err := watch.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- watch.Wait() }()
	// Steps smaller than one growth step (8 MiB), each once the storage
	// has room for it.
	for off := int64(0); off < 64<<20; off += 2 << 20 {
		d.waitStorageRoom(t, id, 4<<20) // the step and room to spare
		fillRandom(t, dev, off, 2<<20)
	}
	if got, err := deviceMD5Err(images[0]); err != nil || got != before {
		t.Fatalf("image md5 %s, %v; want %s; watch printed:\n%s", got, err, before, out.String())
	}
	if files, _ := os.ReadDir(growDir); len(files) < 3 {
		t.Fatalf("%d files in %s, want the user's and several of the watch's; it printed:\n%s", len(files), growDir, out.String())
	}
	d.cli("snapshot", "destroy", "--id", id)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("watch: %v\n%s", err, out.String())
		}
	case <-time.After(30 * time.Second):
		watch.Process.Kill()
		t.Fatalf("watch did not end after its snapshot was destroyed:\n%s", out.String())
	}
	if strings.Contains(out.String(), "corrupted") || strings.Contains(out.String(), "added "+mine) {
		t.Fatalf("the snapshot overflowed, or the watch took the user's file:\n%s", out.String())
	}
	files, _ := os.ReadDir(growDir)
	data, err := os.ReadFile(mine)
	if len(files) != 1 || err != nil || string(data) != "the user's\n" {
		t.Errorf("after the watch: %d files in %s, the user's %q, %v; want only the user's, intact", len(files), growDir, data, err)
	}
}
