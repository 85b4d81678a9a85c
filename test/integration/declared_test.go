//go:build vmtest

package integration

import (
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// TestDeclaredDevices: the devices file's devices are attached at the
// daemon's start, a line with a mistake or a missing backing is reported
// (wait-ready exits 1 naming the lines) without keeping the good one
// down, attach and detach --persist edit the file keeping its comments,
// and after a planned restart the declared device is the same node with
// the same data, not attached twice.
func TestDeclaredDevices(t *testing.T) {
	socket := filepath.Join(t.TempDir(), "ublksnap.sock")
	a, b := tempFile(t, 32<<20), tempFile(t, 16<<20)
	conf := filepath.Join(filepath.Dir(socket), "devices.conf")
	text := "# hand-written\n" +
		"a " + a + " queues=1\n" +
		"typo " + b + " qeues=1\n" +
		"gone /nonexistent/backing.img\n"
	if err := os.WriteFile(conf, []byte(text), 0o644); err != nil {
		t.Fatal(err)
	}
	d := startDaemonOn(t, socket)
	out, errOut, err := d.try("wait-ready")
	if exitCode(err) != 1 || !strings.Contains(errOut, conf+":3: unknown key") || !strings.Contains(errOut, conf+":4:") {
		t.Fatalf("wait-ready with two bad lines: %v, %q, %q; want exit 1 naming lines 3 and 4", err, out, errOut)
	}
	devA := strings.Fields(out)
	if len(devA) != 2 || devA[0] != "a" || !strings.HasPrefix(devA[1], "/dev/ublkb") {
		t.Fatalf("wait-ready printed %q, want a and its device", out)
	}
	fillRandom(t, devA[1], 0, 32<<20)
	sum := deviceMD5(t, devA[1])

	if _, errOut, err := d.try("attach", "--backing", b, "--persist"); exitCode(err) != 2 || !strings.Contains(errOut, "--name") {
		t.Fatalf("attach --persist without a name: %v, %q; want a usage error", err, errOut)
	}
	devB := d.cli("attach", "--backing", b, "--name", "b", "--persist")
	if got, _ := os.ReadFile(conf); string(got) != text+"b "+b+"\n" {
		t.Fatalf("after attach --persist the file is\n%s", got)
	}
	d.cli("detach", "--device", devB, "--persist")
	if got, _ := os.ReadFile(conf); string(got) != text {
		t.Fatalf("after detach --persist the file is\n%s", got)
	}

	d.cmd.Process.Signal(syscall.SIGTERM)
	if err := d.cmd.Wait(); err != nil {
		t.Fatalf("daemon after SIGTERM: %v\n%s", err, d.log)
	}
	d = startDaemonOn(t, socket)
	st := d.status()
	if len(st.Devices) != 1 || st.Devices[0].Path != devA[1] {
		t.Fatalf("devices after the restart %+v, want only %s", st.Devices, devA[1])
	}
	if got := deviceMD5(t, devA[1]); got != sum {
		t.Fatalf("%s reads md5 %s after the restart, was %s", devA[1], got, sum)
	}
	if _, errOut, err := d.try("wait-ready"); exitCode(err) != 1 || strings.Count(errOut, conf+":") != 2 {
		t.Fatalf("wait-ready after the restart: %v, %q; want the same two lines", err, errOut)
	}
}
