//go:build vmtest

package integration

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// exportInfo is export --json.
type exportInfo struct {
	Listen  string
	Address string
	Exports []struct {
		Name, Device, Bitmap string
		Size                 int64
	}
}

// export starts an NBD export of snapshot id on a unix socket in a temp
// dir and returns it with the URI of its first export.
func (d *daemon) export(id string, args ...string) (exportInfo, string) {
	d.t.Helper()
	sock := filepath.Join(d.t.TempDir(), "nbd.sock")
	var e exportInfo
	d.cliJSON(&e, append([]string{"export", "--id", id, "--listen", "unix:" + sock}, args...)...)
	if len(e.Exports) == 0 || e.Address != "unix:"+sock {
		d.t.Fatalf("export: %+v", e)
	}
	return e, fmt.Sprintf("nbd+unix:///%s?socket=%s", e.Exports[0].Name, sock)
}

// nbdMap is nbdinfo --map --json of context at uri: extents with their
// description.
func nbdMap(t testing.TB, uri, context string) []struct {
	Offset, Length int64
	Type           int
	Description    string
} {
	t.Helper()
	var m []struct {
		Offset, Length int64
		Type           int
		Description    string
	}
	out := run(t, "nbdinfo", "--json", "--map="+context, uri)
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("nbdinfo --map=%s: %v\n%s", context, err, out)
	}
	return m
}

// TestNBDExportIsTheImage: nbdcopy and qemu-img read through the export
// exactly what the image device reads; base:allocation covers the image;
// garbage sent to the export ends only that connection; 8 clients copy the
// export at once while the original is written at full speed and every
// copy is the snapshot; destroying the snapshot ends the export.
func TestNBDExportIsTheImage(t *testing.T) {
	d := startDaemon(t)
	const size = 32 << 20
	_, dev := d.attach(size)
	fillRandom(t, dev, 0, size)
	id, images := d.snapshot(t.TempDir(), "128MiB", dev)
	fillRandom(t, dev, 0, 8<<20) // the original moves on
	want := deviceMD5(t, images[0])
	e, uri := d.export(id)
	if e.Exports[0].Device != dev || e.Exports[0].Size != size || e.Exports[0].Bitmap == "" {
		t.Fatalf("export: %+v", e)
	}
	dir := t.TempDir()
	run(t, "nbdcopy", uri, filepath.Join(dir, "nbdcopy.img"))
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", uri, filepath.Join(dir, "qemu.img"))
	// The same through the default export's URI (the empty name), whose
	// block status the stock clients ask for under that name.
	defaultURI := strings.Replace(uri, "/"+e.Exports[0].Name+"?", "/?", 1)
	run(t, "nbdcopy", defaultURI, filepath.Join(dir, "nbdcopy-default.img"))
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", defaultURI, filepath.Join(dir, "qemu-default.img"))
	if m := nbdMap(t, defaultURI, "base:allocation"); len(m) == 0 {
		t.Errorf("nbdinfo --map of the default export: no extents")
	}
	for _, f := range []string{"nbdcopy.img", "qemu.img", "nbdcopy-default.img", "qemu-default.img"} {
		if got := fileMD5(t, filepath.Join(dir, f)); got != want {
			t.Fatalf("%s: md5 %s, the image device reads %s", f, got, want)
		}
	}
	// Read throughput for the log, the same reader on both sides, one run
	// each (TCG varies: compare within one log only): nbdcopy from the
	// export and from the image device, dd of the image device with direct
	// I/O.
	for _, r := range []struct {
		name string
		args []string
	}{
		{"nbdcopy export", []string{"nbdcopy", uri, "null:"}},
		{"nbdcopy image device", []string{"nbdcopy", images[0], "null:"}},
		{"dd image device", []string{"dd", "if=" + images[0], "of=/dev/null", "bs=1M", "iflag=direct"}},
	} {
		start := time.Now()
		run(t, r.args[0], r.args[1:]...)
		d := time.Since(start)
		t.Logf("read %d MiB: %-20s %v (%.0f MiB/s)", size>>20, r.name, d.Round(time.Millisecond), float64(size>>20)/d.Seconds())
	}

	var covered int64
	for _, x := range nbdMap(t, uri, "base:allocation") {
		if x.Offset != covered || x.Type != 0 {
			t.Fatalf("base:allocation extent %+v after %d bytes: want data, contiguous", x, covered)
		}
		covered += x.Length
	}
	if covered != size {
		t.Fatalf("base:allocation covers %d bytes of %d", covered, int64(size))
	}
	list := run(t, "nbdinfo", "--list", "--content", uri)
	for _, s := range []string{"base:allocation", e.Exports[0].Bitmap} {
		if !strings.Contains(list, s) {
			t.Errorf("nbdinfo --list does not show context %s:\n%s", s, list)
		}
	}

	// Garbage ends that connection only.
	sock := strings.TrimPrefix(e.Address, "unix:")
	for _, junk := range []string{"", "hello", strings.Repeat("\xff", 300)} {
		c, err := net.Dial("unix", sock)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte(junk))
		c.Close()
	}
	if out, err := runErr("nbdinfo", "--size", uri); err != nil || strings.TrimSpace(out) != fmt.Sprint(size) {
		t.Fatalf("nbdinfo after garbage: %q %v", out, err)
	}
	// A write is refused.
	if out, err := runErr("nbdsh", "-u", uri, "-c", "h.pwrite(b'x' * 512, 0)"); err == nil || !strings.Contains(out, "Operation not permitted") {
		t.Fatalf("a write through the export: %v\n%s", err, out)
	}

	// 8 clients at once while the original is written at full speed.
	writer := exec.Command("fio", "--name=w", "--thread", "--filename="+dev, "--rw=randwrite", "--bs=64k", "--ioengine=libaio",
		"--iodepth=16", "--direct=1", "--time_based", "--runtime=600")
	if err := writer.Start(); err != nil {
		t.Fatal(err)
	}
	stopWriter := sync.OnceFunc(func() { writer.Process.Kill(); writer.Wait() })
	t.Cleanup(stopWriter)
	var wg sync.WaitGroup
	sums := make([]string, 8)
	errs := make([]error, 8)
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out := filepath.Join(dir, fmt.Sprintf("client%d.img", i))
			if b, err := exec.Command("nbdcopy", uri, out).CombinedOutput(); err != nil {
				errs[i] = fmt.Errorf("nbdcopy %d: %v\n%s", i, err, b)
				return
			}
			sums[i] = fileMD5(t, out)
			os.Remove(out)
		}()
	}
	wg.Wait()
	stopWriter()
	for i := range 8 {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if sums[i] != want {
			t.Fatalf("client %d copied md5 %s, the snapshot is %s", i, sums[i], want)
		}
	}

	var listed []exportInfo
	d.cliJSON(&listed, "export", "list")
	if len(listed) != 1 || listed[0].Address != e.Address {
		t.Fatalf("export list: %+v", listed)
	}
	d.cli("snapshot", "destroy", "--id", id)
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := os.Stat(sock)
		if os.IsNotExist(err) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the export's socket is still there after destroy: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	d.cliJSON(&listed, "export", "list")
	if len(listed) != 0 {
		t.Fatalf("export list after destroy: %+v", listed)
	}
	d.cli("detach", "--device", dev)
}

// TestNBDDirtyBitmapIncrementalBackup: the dirty bitmap of the second
// take lists exactly the tracking blocks written between the takes; a
// full copy with nbdcopy plus an incremental one with a short libnbd
// script that copies only dirty extents gives the second image exactly.
func TestNBDDirtyBitmapIncrementalBackup(t *testing.T) {
	d := startDaemon(t)
	const size = 64 << 20
	_, dev := d.attach(size)
	fillRandom(t, dev, 0, size)
	store := t.TempDir()
	id, _ := d.snapshot(store, "128MiB", dev)
	p1 := d.cbtInfo(dev)
	_, uri := d.export(id)
	backup := filepath.Join(t.TempDir(), "backup.img")
	run(t, "nbdcopy", uri, backup)
	d.cli("snapshot", "destroy", "--id", id)

	bs := p1.BlockSize
	rng := testRand(t, 5)
	written := map[int64]bool{0: true}
	fillRandom(t, dev, 0, 4096)
	for range 20 {
		off := rng.Int64N(size/4096) * 4096
		fillRandom(t, dev, off, 4096)
		written[off/bs] = true
	}
	id, images := d.snapshot(store, "128MiB", dev)
	e, uri := d.export(id)
	bitmap := fmt.Sprintf("qemu:dirty-bitmap:since-%s-%d", p1.Generation, p1.Changes)
	if e.Exports[0].Bitmap != bitmap {
		t.Fatalf("export offers bitmap %q, want %q", e.Exports[0].Bitmap, bitmap)
	}
	var dirty []int64
	var covered int64
	for _, x := range nbdMap(t, uri, bitmap) {
		if x.Offset != covered {
			t.Fatalf("bitmap extent %+v after %d bytes", x, covered)
		}
		covered += x.Length
		if x.Description == "dirty" {
			for b := x.Offset / bs; b*bs < x.Offset+x.Length; b++ {
				dirty = append(dirty, b)
			}
		}
	}
	if covered != size || !slices.Equal(dirty, blockSet(written)) {
		t.Fatalf("dirty blocks %v (%d bytes covered)\nwritten %v", dirty, covered, blockSet(written))
	}
	// A point of another generation, or in the future, is not offered.
	for _, bad := range []string{"qemu:dirty-bitmap:since-00000000-0000-4000-8000-000000000000-1",
		fmt.Sprintf("qemu:dirty-bitmap:since-%s-%d", p1.Generation, p1.Changes+2)} {
		if out, err := runErr("nbdinfo", "--map="+bad, uri); err == nil {
			t.Errorf("nbdinfo --map=%s succeeded:\n%s", bad, out)
		}
	}
	script := `
import sys
context, uri, path = sys.argv[1:4]
h.add_meta_context(context)
h.connect_uri(uri)
size = h.get_size()
dirty = []
pos = 0
def extents(metacontext, off, entries, err):
    global pos
    for i in range(0, len(entries), 2):
        if entries[i + 1] & 1:
            dirty.append((pos, entries[i]))
        pos += entries[i]
while pos < size:
    h.block_status(min(size - pos, 1 << 30), pos, extents)
copied = 0
with open(path, "r+b") as out:
    for off, n in dirty:
        out.seek(off)
        out.write(h.pread(n, off))
        copied += n
print(copied)
`
	scriptFile := filepath.Join(t.TempDir(), "incremental.py")
	if err := os.WriteFile(scriptFile, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	copied := strings.TrimSpace(run(t, "nbdsh", "-c", fmt.Sprintf("sys.argv = ['x', %q, %q, %q]; exec(open(%q).read())", bitmap, uri, backup, scriptFile)))
	if want := fmt.Sprint(int64(len(written)) * bs); copied != want {
		t.Errorf("the incremental copy read %s bytes, the dirty blocks hold %s", copied, want)
	}
	if got, want := fileMD5(t, backup), deviceMD5(t, images[0]); got != want {
		t.Fatalf("full + incremental backup: md5 %s, the second image reads %s", got, want)
	}
	d.cli("snapshot", "destroy", "--id", id)
	d.cli("detach", "--device", dev)
}

// TestNBDBaseAllocationHoles: over a sparse backing file, base:allocation
// reports the holes the image reads as zeros, and only such: not a hole
// punched into the original after the take (the image still shows the old
// data there); nbdcopy, which skips holes, copies the image exactly.
func TestNBDBaseAllocationHoles(t *testing.T) {
	d := startDaemon(t)
	const size = 64 << 20
	_, dev := d.attach(size) // a sparse file
	written := [][2]int64{{4 << 20, 4 << 20}, {32<<20 + 4096, 64 << 10}}
	for _, w := range written {
		fillRandom(t, dev, w[0], w[1])
	}
	id, images := d.snapshot(t.TempDir(), "128MiB", dev)
	fillRandom(t, dev, 16<<20, 1<<20) // into a hole, after the take
	// A hole punched after the take into data the image still shows:
	// only the chunk check keeps it from being reported as zeros.
	run(t, "blkdiscard", "--offset", fmt.Sprint(5<<20), "--length", fmt.Sprint(1<<20), dev)
	_, uri := d.export(id)
	img, err := os.Open(images[0])
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	var pos, zero int64
	for _, x := range nbdMap(t, uri, "base:allocation") {
		if x.Offset != pos {
			t.Fatalf("extent %+v after %d bytes", x, pos)
		}
		pos += x.Length
		if x.Type&2 == 0 {
			continue
		}
		zero += x.Length
		for _, w := range written {
			if w[0] < x.Offset+x.Length && x.Offset < w[0]+w[1] {
				t.Fatalf("extent %+v (%s) overlaps data written before the take at [%d+%d]", x, x.Description, w[0], w[1])
			}
		}
		buf := make([]byte, x.Length)
		if _, err := img.ReadAt(buf, x.Offset); err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(buf, make([]byte, x.Length)) {
			t.Fatalf("extent %+v (%s) does not read as zeros", x, x.Description)
		}
	}
	img.Close()
	if pos != size || zero < 48<<20 {
		t.Fatalf("base:allocation covers %d bytes, %d of them zero; want %d, most of them zero", pos, zero, int64(size))
	}
	out := filepath.Join(t.TempDir(), "copy.img")
	run(t, "nbdcopy", uri, out)
	if got, want := fileMD5(t, out), deviceMD5(t, images[0]); got != want {
		t.Fatalf("nbdcopy of the sparse image: md5 %s, the image reads %s", got, want)
	}
	t.Logf("base:allocation: %d of %d bytes are holes", zero, int64(size))
	d.cli("snapshot", "destroy", "--id", id)
	d.cli("detach", "--device", dev)
}
