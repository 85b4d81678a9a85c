//go:build vmtest

package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// daemon is a running `ublksnap daemon` and the CLI that talks to it.
type daemon struct {
	t      testing.TB
	bin    string // the ublksnap binary
	socket string
	// devicesFile is the daemon's and the CLI's --devices-file, beside
	// the socket (none unless a test writes it), never the host's.
	devicesFile string
	cmd         *exec.Cmd
	log         *bytes.Buffer
}

// ublksnapBin returns the binary under test: $UBLKSNAP_BIN or bin/ublksnap.
func ublksnapBin(t testing.TB) string {
	bin := os.Getenv("UBLKSNAP_BIN")
	if bin == "" {
		bin = "bin/ublksnap"
	}
	abs, err := filepath.Abs(bin)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(abs); err != nil {
		t.Fatalf("ublksnap binary: %v (build it with make build)", err)
	}
	return abs
}

// startDaemon starts a daemon on a private socket; cleanup stops it with
// ublksnap shutdown --force and checks that it left no ublk device behind.
func startDaemon(t testing.TB, flags ...string) *daemon {
	t.Helper()
	return startDaemonOn(t, filepath.Join(t.TempDir(), "ublksnap.sock"), flags...)
}

// startDaemonOn starts a daemon on socket (and the state file beside it).
func startDaemonOn(t testing.TB, socket string, flags ...string) *daemon {
	t.Helper()
	d := &daemon{t: t, bin: ublksnapBin(t), socket: socket, devicesFile: filepath.Join(filepath.Dir(socket), "devices.conf"), log: &bytes.Buffer{}}
	d.cmd = exec.Command(d.bin, append([]string{"daemon", "--socket", d.socket, "--devices-file", d.devicesFile}, flags...)...)
	d.cmd.Stdout, d.cmd.Stderr = d.log, d.log
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		if _, _, err := d.try("status"); err == nil {
			break
		}
		if time.Now().After(deadline) {
			d.cmd.Process.Kill()
			t.Fatalf("daemon did not answer on %s within 20s; its log:\n%s", d.socket, d.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Cleanup(func() { d.stop() })
	return d
}

// stop stops the daemon for good (shutdown --force), waits, and checks
// that no ublk device is left.
func (d *daemon) stop() {
	d.t.Helper()
	if d.cmd.ProcessState != nil {
		return
	}
	defer func() {
		if d.t.Failed() {
			d.t.Logf("daemon log:\n%s", d.log)
		}
	}()
	if _, errOut, err := d.try("shutdown", "--force"); err != nil {
		d.t.Errorf("ublksnap shutdown --force: %v: %s", err, errOut)
		d.cmd.Process.Signal(syscall.SIGTERM)
	}
	done := make(chan error, 1)
	go func() { done <- d.cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			d.t.Errorf("daemon exited with %v; its log:\n%s", err, d.log)
		}
	case <-time.After(60 * time.Second):
		d.cmd.Process.Kill()
		d.t.Errorf("daemon did not stop within 60s of shutdown; its log:\n%s", d.log)
	}
	if left, _ := filepath.Glob("/dev/ublk[bc]*"); len(left) > 0 {
		d.t.Errorf("ublk devices left after the daemon stopped: %v", left)
	}
}

// try runs a CLI command and returns stdout, stderr and the error.
func (d *daemon) try(args ...string) (string, string, error) {
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(d.bin, append([]string{"--socket", d.socket, "--devices-file", d.devicesFile}, args...)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		return "", "", err
	}
	// No command may hang a test: after cliTimeout the threads of every
	// ublksnap process are shown, and the command is killed.
	timer := time.AfterFunc(cliTimeout, func() {
		var b strings.Builder
		comms, _ := filepath.Glob("/proc/[0-9]*/comm")
		for _, c := range comms {
			if name, _ := os.ReadFile(c); strings.TrimSpace(string(name)) == "ublksnap" {
				pid, _ := strconv.Atoi(filepath.Base(filepath.Dir(c)))
				b.WriteString(taskStacks(pid))
			}
		}
		d.t.Errorf("ublksnap %s: no answer in %v; ublksnap processes:\n%s", strings.Join(args, " "), cliTimeout, b.String())
		cmd.Process.Kill()
	})
	err := cmd.Wait()
	timer.Stop()
	return stdout.String(), stderr.String(), err
}

// cliTimeout bounds one CLI command in the tests.
const cliTimeout = 4 * time.Minute

// cli runs a CLI command that must succeed and returns its trimmed stdout.
func (d *daemon) cli(args ...string) string {
	d.t.Helper()
	out, errOut, err := d.try(args...)
	if err != nil {
		d.t.Fatalf("ublksnap %s: %v\nstderr: %s\ndaemon log:\n%s", strings.Join(args, " "), err, errOut, d.log)
	}
	return strings.TrimSpace(out)
}

// cliJSON runs a CLI command with --json and decodes its output into v.
func (d *daemon) cliJSON(v any, args ...string) {
	d.t.Helper()
	out := d.cli(append(args, "--json")...)
	if err := json.Unmarshal([]byte(out), v); err != nil {
		d.t.Fatalf("ublksnap %s --json: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// attach attaches a new sparse backing file of size bytes and returns the
// backing file and the filtered device.
func (d *daemon) attach(size int64) (backing, dev string) {
	d.t.Helper()
	backing = tempFile(d.t, size)
	dev = d.cli("attach", "--backing", backing)
	if !strings.HasPrefix(dev, "/dev/ublkb") {
		d.t.Fatalf("attach printed %q, want /dev/ublkbN", dev)
	}
	return backing, dev
}

// snapshot creates a snapshot of devices with the given storage and limit,
// takes it, and returns its id and the image of each device in order.
func (d *daemon) snapshot(storage, limit string, devices ...string) (string, []string) {
	d.t.Helper()
	args := []string{"snapshot", "create", "--storage", storage, "--limit", limit}
	for _, dev := range devices {
		args = append(args, "--device", dev)
	}
	id := d.cli(args...)
	images := map[string]string{}
	for _, line := range strings.Split(d.cli("snapshot", "take", "--id", id), "\n") {
		f := strings.Fields(line)
		if len(f) == 2 {
			images[f[0]] = f[1]
		}
	}
	var out []string
	for _, dev := range devices {
		img, ok := images[dev]
		if !ok {
			d.t.Fatalf("snapshot take printed no image for %s (got %v)", dev, images)
		}
		out = append(out, img)
	}
	return id, out
}

// mountRO mounts dev read-only (ext4 without journal replay) on a temp dir.
func mountRO(t testing.TB, dev string) string {
	t.Helper()
	dir := t.TempDir()
	run(t, "mount", "-o", "ro,noload", dev, dir)
	t.Cleanup(func() { runErr("umount", dir) })
	return dir
}

// writeSums writes the md5sum listing into the filesystem at dir.
func writeSums(t testing.TB, dir, sums string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, "MD5SUMS"), []byte(sums), 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "sync")
}

// checkSumsFile verifies the MD5SUMS listing stored in the filesystem at dir.
func checkSumsFile(t testing.TB, dir string) {
	t.Helper()
	sums, err := os.ReadFile(filepath.Join(dir, "MD5SUMS"))
	if err != nil {
		t.Fatal(err)
	}
	checkTree(t, dir, string(sums))
}

// churn makes n writes under dir, two in three overwriting a listed file
// and one in three adding a new one, and returns what it wrote: path
// relative to dir → content.
func churn(dir string, n int) churnResult {
	res := churnResult{wrote: map[string][]byte{}}
	for i := range n {
		rel := filepath.Join(fmt.Sprintf("d%02d", i%7), fmt.Sprintf("f%04d", i%40))
		if i%3 == 0 {
			rel = fmt.Sprintf("new%05d", i)
		}
		data := bytes.Repeat([]byte{byte(i)}, 4096*(1+i%50))
		if err := os.WriteFile(filepath.Join(dir, rel), data, 0o644); err != nil {
			res.err = err
			return res
		}
		res.wrote[rel] = data
	}
	return res
}

// churnResult is what churn wrote, or the error that stopped it.
type churnResult struct {
	wrote map[string][]byte
	err   error
}

// check verifies that dir holds what churn wrote.
func (c churnResult) check(t testing.TB, dir string) {
	t.Helper()
	for rel, want := range c.wrote {
		got, err := os.ReadFile(filepath.Join(dir, rel))
		if err != nil || !bytes.Equal(got, want) {
			t.Fatalf("original %s: %d bytes, %v; want the %d bytes written last", rel, len(got), err, len(want))
		}
	}
}

// unchurned returns the md5sum lines of sums whose files churn did not touch.
func (c churnResult) unchurned(sums string) string {
	var keep []string
	for _, line := range strings.Split(strings.TrimSpace(sums), "\n") {
		if f := strings.Fields(line); len(f) == 2 && c.wrote[f[1]] == nil {
			keep = append(keep, line)
		}
	}
	return strings.Join(keep, "\n") + "\n"
}

func TestSnapshotPointInTimeExt4(t *testing.T) {
	d := startDaemon(t)
	_, dev := d.attach(256 << 20)
	dir := mkfsMount(t, dev)
	sums := writeTree(t, dir, 60)
	writeSums(t, dir, sums)

	_, images := d.snapshot(t.TempDir(), "256MiB", dev)
	res := churn(dir, 120)
	if res.err != nil {
		t.Fatalf("writes to the original after the take: %v", res.err)
	}
	run(t, "sync")

	// The image shows the moment of the take: its listing checks, fsck is clean.
	run(t, "fsck.ext4", "-fn", images[0])
	img := mountRO(t, images[0])
	checkSumsFile(t, img)
	if _, err := os.Stat(filepath.Join(img, "new00000")); err == nil {
		t.Fatal("the image shows new00000, written after the take")
	}
	run(t, "umount", img)

	// The original has the newest data, and its untouched files are intact.
	res.check(t, dir)
	checkTree(t, dir, res.unchurned(sums))
	run(t, "umount", dir)
	run(t, "fsck.ext4", "-fn", dev)
}

// TestDaemonAPIWithCurl checks that the protocol is plain HTTP+JSON that
// curl can speak on the socket, and that the socket is private.
func TestDaemonAPIWithCurl(t *testing.T) {
	d := startDaemon(t)
	_, dev := d.attach(32 << 20)
	out := run(t, "curl", "-sS", "--fail", "--unix-socket", d.socket, "http://ublksnap/v1/status")
	var st daemonStatus
	if err := json.Unmarshal([]byte(out), &st); err != nil || len(st.Devices) != 1 || st.Devices[0].Path != dev {
		t.Fatalf("curl /v1/status: %v\n%s", err, out)
	}
	out, err := runErr("curl", "-sS", "--unix-socket", d.socket, "-X", "POST", "http://ublksnap/v1/snapshots/none/take")
	if err != nil || !strings.Contains(out, `"code": "not_found"`) {
		t.Fatalf("curl take of an unknown snapshot: %v\n%s", err, out)
	}
	fi, err := os.Stat(d.socket)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, %v; want 0600", fi.Mode().Perm(), err)
	}
}
