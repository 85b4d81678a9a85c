//go:build vmtest

package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// cbtInfo is cbt info --json.
type cbtInfo struct {
	BlockSize  int64  `json:"block_size"`
	BlockCount int64  `json:"block_count"`
	Capacity   int64  `json:"capacity"`
	Generation string `json:"generation"`
	Changes    int    `json:"changes"`
}

func (i cbtInfo) point() string { return fmt.Sprintf("%s:%d", i.Generation, i.Changes) }

func (d *daemon) cbtInfo(dev string) cbtInfo {
	d.t.Helper()
	var i cbtInfo
	d.cliJSON(&i, "cbt", "info", "--device", dev)
	return i
}

type extent struct{ Offset, Length int64 }

// changedBlocks returns the tracking blocks cbt changes reports since
// point, and whether it answered "full".
func (d *daemon) changedBlocks(dev, point string, bs int64) ([]int64, bool) {
	d.t.Helper()
	var out struct {
		Full    bool
		Extents []extent
	}
	d.cliJSON(&out, "cbt", "changes", "--device", dev, "--since", point)
	var blocks []int64
	for _, e := range out.Extents {
		for b := e.Offset / bs; b*bs < e.Offset+e.Length; b++ {
			blocks = append(blocks, b)
		}
	}
	return blocks, out.Full
}

// blockSet returns the sorted distinct blocks of a set.
func blockSet(m map[int64]bool) []int64 {
	var out []int64
	for b := range m {
		out = append(out, b)
	}
	slices.Sort(out)
	return out
}

// TestCBTReportsExactlyTheChangedBlocks: writes to the original, writes to
// the image and mark-dirty ranges (several, block 0, the last partial
// block) are reported changed, and nothing else, at block granularity.
func TestCBTReportsExactlyTheChangedBlocks(t *testing.T) {
	d := startDaemon(t)
	const size = 64<<20 + 4096 // the last tracking block is partial
	_, dev := d.attach(size)
	info := d.cbtInfo(dev)
	bs := info.BlockSize
	last := (size - 1) / bs
	if info.Capacity != size || info.BlockCount != last+1 {
		t.Fatalf("cbt info of a %d-byte device: %+v", int64(size), info)
	}
	store := t.TempDir()
	rng := testRand(t, 11)
	id, _ := d.snapshot(store, "64MiB", dev)
	p1 := d.cbtInfo(dev)
	d.cli("snapshot", "destroy", "--id", id)

	// Writes to the original between takes 1 and 2.
	original := map[int64]bool{0: true, last: true}
	fillRandom(t, dev, 0, 4096)
	fillRandom(t, dev, size-4096, 4096)
	for range 12 {
		b := rng.Int64N(last)
		original[b] = true
		fillRandom(t, dev, b*bs+rng.Int64N(bs/4096)*4096, 4096)
	}
	id, images := d.snapshot(store, "64MiB", dev)
	p2 := d.cbtInfo(dev)
	if p2.Generation != p1.Generation || p2.Changes != p1.Changes+1 {
		t.Fatalf("take 2: %+v after %+v", p2, p1)
	}
	// While snapshot 2 is held: image writes and dirty ranges.
	forced := map[int64]bool{}
	for range 3 {
		b := rng.Int64N(last)
		forced[b] = true
		fillRandom(t, images[0], b*bs, 4096)
	}
	d1, d2 := 5+rng.Int64N(last-10), 5+rng.Int64N(last-10)
	forced[d1], forced[d2], forced[d2+1] = true, true, true
	sector := func(b int64) int64 { return b * bs / 512 }
	d.cli("cbt", "mark-dirty", "--device", dev, "--ranges", fmt.Sprintf("%d:1", sector(d1)+3),
		"--ranges", fmt.Sprintf("%d:%d", sector(d2+1)-1, 2))
	want := map[int64]bool{}
	for b := range original {
		want[b] = true
	}
	for b := range forced {
		want[b] = true
	}
	if got, full := d.changedBlocks(dev, p1.point(), bs); full || !slices.Equal(got, blockSet(want)) {
		t.Fatalf("changed since take 1: %v (full %v)\nwant %v", got, full, blockSet(want))
	}
	raw := filepath.Join(t.TempDir(), "map")
	d.cli("cbt", "read", "--device", dev, "--output", raw)
	if m, err := os.ReadFile(raw); err != nil || int64(len(m)) != info.BlockCount || int(m[0]) != p2.Changes {
		t.Fatalf("cbt read: %d bytes, first %v, %v; want %d bytes, first %d", len(m), m[:min(1, len(m))], err, info.BlockCount, p2.Changes)
	}
	d.cli("snapshot", "destroy", "--id", id)

	// The image writes and dirty ranges are forced into the next backup.
	id, _ = d.snapshot(store, "64MiB", dev)
	p3 := d.cbtInfo(dev)
	if got, full := d.changedBlocks(dev, p2.point(), bs); full || !slices.Equal(got, blockSet(forced)) {
		t.Fatalf("changed since take 2: %v (full %v), want %v", got, full, blockSet(forced))
	}
	d.cli("snapshot", "destroy", "--id", id)
	id, _ = d.snapshot(store, "64MiB", dev)
	if got, full := d.changedBlocks(dev, p3.point(), bs); full || len(got) != 0 {
		t.Fatalf("nothing written since take 3, yet changed: %v (full %v)", got, full)
	}
	if _, full := d.changedBlocks(dev, "00000000-0000-0000-0000-000000000000:1", bs); !full {
		t.Fatal("another generation is not answered full")
	}
	d.cli("snapshot", "destroy", "--id", id)

	for _, c := range []struct {
		args []string
		code int
	}{
		{[]string{"cbt", "info", "--device", "/dev/ublkb999"}, 1},
		{[]string{"cbt", "mark-dirty", "--device", dev, "--ranges", fmt.Sprintf("%d:16", size/512-8)}, 1},
		{[]string{"cbt", "mark-dirty", "--device", dev, "--ranges", "10:x"}, 2},
		{[]string{"cbt", "mark-dirty", "--device", dev}, 2},
		{[]string{"cbt", "changes", "--device", dev, "--since", "yesterday"}, 2},
	} {
		if _, stderr, err := d.try(c.args...); exitCode(err) != c.code || stderr == "" {
			t.Errorf("ublksnap %s: exit %d (want %d), stderr %q", strings.Join(c.args, " "), exitCode(err), c.code, stderr)
		}
	}
}

// backupResult is the last line of backup --json.
type backupResult struct {
	Manifest string
	Full     bool
	Reason   string
	Bytes    int64
}

// backup runs ublksnap backup and returns its result.
func (d *daemon) backup(args ...string) backupResult {
	d.t.Helper()
	out := d.cli(append([]string{"backup", "--json"}, args...)...)
	lines := strings.Split(out, "\n")
	var r backupResult
	if err := json.Unmarshal([]byte(lines[len(lines)-1]), &r); err != nil || r.Manifest == "" {
		d.t.Fatalf("backup --json printed %q: %v", out, err)
	}
	return r
}

// fileMD5 returns the md5 of a file.
func fileMD5(t testing.TB, p string) string {
	t.Helper()
	return strings.Fields(run(t, "md5sum", p))[0]
}

// TestBackupChainRestoresEveryCycle: 25 cycles of writes to an ext4
// filesystem and to raw ranges, each followed by an incremental backup;
// every cycle the restored chain equals that cycle's snapshot image, and
// each incremental holds exactly the changed blocks.
func TestBackupChainRestoresEveryCycle(t *testing.T) {
	d := startDaemon(t)
	const size, fsSize = 24 << 20, 16 << 20
	_, dev := d.attach(size)
	run(t, "mkfs.ext4", "-q", "-F", dev, fmt.Sprintf("%dM", fsSize>>20))
	dir := t.TempDir()
	run(t, "mount", dev, dir)
	t.Cleanup(func() { runErr("umount", dir) })
	bs := d.cbtInfo(dev).BlockSize
	rng := testRand(t, 25)
	root, store := t.TempDir(), t.TempDir()
	prev, prevPoint := "", ""
	var fullBytes, incBytes int64
	start := time.Now()
	for cycle := range 25 {
		for i := range 1 + rng.IntN(3) {
			data := make([]byte, 4096*(1+rng.IntN(32)))
			for j := range data {
				data[j] = byte(rng.Uint32())
			}
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%d-%d", cycle, i)), data, 0o644); err != nil {
				t.Fatal(err)
			}
		}
		for range 1 + rng.IntN(3) {
			fillRandom(t, dev, fsSize+rng.Int64N((size-fsSize)/4096)*4096, 4096)
		}
		id, images := d.snapshot(store, "32MiB", dev)
		var changed int64
		if prevPoint != "" {
			blocks, full := d.changedBlocks(dev, prevPoint, bs)
			if full {
				t.Fatalf("cycle %d: change tracking answers full", cycle)
			}
			changed = int64(len(blocks)) * bs
		}
		args := []string{"--device", dev, "--output", filepath.Join(root, fmt.Sprintf("b%02d", cycle))}
		if prev != "" {
			args = append(args, "--since", prev)
		}
		res := d.backup(args...)
		switch {
		case cycle == 0 && !res.Full:
			t.Fatalf("the first backup is not full: %+v", res)
		case cycle > 0 && (res.Full || res.Bytes != changed):
			t.Fatalf("cycle %d: incremental %+v, changed blocks hold %d bytes", cycle, res, changed)
		}
		if cycle == 0 {
			fullBytes = res.Bytes
		} else {
			incBytes += res.Bytes
		}
		restored := filepath.Join(root, "restored.img")
		d.cli("restore", "--manifest", res.Manifest, "--output", restored)
		if got, want := fileMD5(t, restored), deviceMD5(t, images[0]); got != want {
			t.Fatalf("cycle %d: the restored chain differs from the snapshot image", cycle)
		}
		os.Remove(restored)
		prev, prevPoint = res.Manifest, d.cbtInfo(dev).point()
		d.cli("snapshot", "destroy", "--id", id)
	}
	t.Logf("25 backups in %v: full %d bytes, 24 incrementals %d bytes", time.Since(start).Round(time.Second), fullBytes, incBytes)
	run(t, "umount", dir)
	run(t, "fsck.ext4", "-fn", dev)
}

// TestBackupFullWhenHistoryIsLost: a backup takes and destroys its own
// snapshot; a planned restart keeps the generation and the changes, so an
// incremental follows; a killed daemon and a resized backing start a new
// generation, and the next backup is full, saying why.
func TestBackupFullWhenHistoryIsLost(t *testing.T) {
	d := startDaemon(t)
	backing, dev := d.attach(32 << 20)
	fillRandom(t, dev, 0, 1<<20)
	root := t.TempDir()
	full := d.backup("--device", dev, "--output", filepath.Join(root, "full"))
	if !full.Full {
		t.Fatalf("first backup: %+v", full)
	}
	if st := d.status(); len(st.Snapshots) != 0 {
		t.Fatalf("the backup left its snapshot: %+v", st.Snapshots)
	}

	fillRandom(t, dev, 8<<20, 4096)
	before := d.cbtInfo(dev)
	d.cmd.Process.Signal(syscall.SIGTERM)
	if err := d.cmd.Wait(); err != nil {
		t.Fatalf("daemon after SIGTERM: %v\n%s", err, d.log)
	}
	d = startDaemonOn(t, d.socket)
	if after := d.cbtInfo(dev); after != before {
		t.Fatalf("change tracking after a planned restart: %+v, before %+v", after, before)
	}
	inc := d.backup("--device", dev, "--output", filepath.Join(root, "inc"), "--since", full.Manifest)
	if inc.Full || inc.Bytes != before.BlockSize {
		t.Fatalf("incremental after a planned restart: %+v, want the one block written", inc)
	}

	fillRandom(t, dev, 9<<20, 4096)
	d.crash()
	d = startDaemonOn(t, d.socket)
	if d.cbtInfo(dev).Generation == before.Generation {
		t.Fatal("a killed daemon's change tracking kept its generation")
	}
	after := d.backup("--device", dev, "--output", filepath.Join(root, "crash"), "--since", inc.Manifest)
	if !after.Full || !strings.Contains(after.Reason, "generation") {
		t.Fatalf("backup after a crash: %+v, want full for a new generation", after)
	}

	d.cli("detach", "--device", dev)
	if err := os.Truncate(backing, 33<<20); err != nil {
		t.Fatal(err)
	}
	dev = d.cli("attach", "--backing", backing)
	resized := d.backup("--device", dev, "--output", filepath.Join(root, "resized"), "--since", after.Manifest)
	if !resized.Full || !strings.Contains(resized.Reason, "bytes") {
		t.Fatalf("backup after a resize: %+v, want full", resized)
	}
	d.cli("restore", "--manifest", resized.Manifest, "--output", filepath.Join(root, "r.img"))
	if got, want := fileMD5(t, filepath.Join(root, "r.img")), deviceMD5(t, dev); got != want {
		t.Fatal("the restored full backup differs from the device")
	}
}

// TestBackupBadInput: clear errors, exit 1, nothing written over.
func TestBackupBadInput(t *testing.T) {
	d := startDaemon(t)
	_, dev := d.attach(16 << 20)
	_, other := d.attach(16 << 20)
	fillRandom(t, dev, 0, 16<<20)
	root := t.TempDir()
	full := d.backup("--device", dev, "--output", filepath.Join(root, "full"))
	fillRandom(t, dev, 0, 4096)
	inc := d.backup("--device", dev, "--output", filepath.Join(root, "inc"), "--since", full.Manifest)
	restored := filepath.Join(root, "restored")
	if err := os.WriteFile(restored, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	fails := func(want string, args ...string) {
		t.Helper()
		_, stderr, err := d.try(args...)
		if exitCode(err) != 1 || !strings.Contains(stderr, want) {
			t.Errorf("ublksnap %s: exit %d, stderr %q; want exit 1 saying %q", strings.Join(args, " "), exitCode(err), stderr, want)
		}
	}
	fails("unknown device", "backup", "--device", "/dev/ublkb999", "--output", filepath.Join(root, "x"))
	fails("not of", "backup", "--device", other, "--output", filepath.Join(root, "y"), "--since", inc.Manifest)
	fails("already holds a backup", "backup", "--device", dev, "--output", filepath.Join(root, "inc"))
	fails("exists", "restore", "--manifest", inc.Manifest, "--output", restored)
	for _, p := range []string{filepath.Join(root, "x"), filepath.Join(root, "y")} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("a refused backup left %s", p)
		}
	}
	if b, _ := os.ReadFile(restored); string(b) != "keep me" {
		t.Fatal("a refused restore wrote over its output")
	}
	if _, _, err := d.try("restore", "--manifest", inc.Manifest, "--output", filepath.Join(root, "ok")); err != nil {
		t.Fatalf("the refused commands damaged the chain: %v", err)
	}

	// A corrupted extent, then a missing link: named, nothing written.
	data := filepath.Join(root, "full", "data")
	f, err := os.OpenFile(data, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{0x5a}, 1<<20)
	f.Close()
	fails(data, "restore", "--manifest", inc.Manifest, "--output", filepath.Join(root, "bad"))
	os.Rename(filepath.Join(root, "full"), filepath.Join(root, "gone"))
	fails(filepath.Join(root, "full", "manifest.json"), "restore", "--manifest", inc.Manifest, "--output", filepath.Join(root, "bad"))
	if _, err := os.Stat(filepath.Join(root, "bad")); !os.IsNotExist(err) {
		t.Fatal("a failed restore left its output")
	}
	if _, _, err := d.try("restore", "--manifest", inc.Manifest); exitCode(err) != 2 {
		t.Errorf("restore without --output: exit %d, want 2", exitCode(err))
	}
}

// api sends one request to the daemon's HTTP API and decodes the answer.
func (d *daemon) api(method, path, body string, out any) {
	d.t.Helper()
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", d.socket)
	}}}
	req, err := http.NewRequest(method, "http://ublksnap"+path, strings.NewReader(body))
	if err != nil {
		d.t.Fatal(err)
	}
	resp, err := c.Do(req)
	if err != nil {
		d.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusOK {
		d.t.Fatalf("%s %s: %s %s", method, path, resp.Status, b)
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			d.t.Fatalf("%s %s: %v", method, path, err)
		}
	}
}

// TestCBTWrapForcesAFullBackup: the 255th take starts a new generation
// (the interval number has one byte), and the backup after it is full.
func TestCBTWrapForcesAFullBackup(t *testing.T) {
	d := startDaemon(t)
	_, dev := d.attach(8 << 20)
	root, store := t.TempDir(), t.TempDir()
	first := d.backup("--device", dev, "--output", filepath.Join(root, "first"))
	gen := d.cbtInfo(dev).Generation
	start := time.Now()
	create := fmt.Sprintf(`{"devices":[%q],"storage":%q,"limit":8388608}`, dev, store)
	for i := d.cbtInfo(dev).Changes; i < 254; i++ {
		var s struct{ ID string }
		d.api(http.MethodPost, "/v1/snapshots", create, &s)
		d.api(http.MethodPost, "/v1/snapshots/"+s.ID+"/take", "", nil)
		d.api(http.MethodDelete, "/v1/snapshots/"+s.ID, "", nil)
	}
	t.Logf("253 takes in %v", time.Since(start).Round(time.Millisecond))
	if i := d.cbtInfo(dev); i.Changes != 254 || i.Generation != gen {
		t.Fatalf("after 254 takes: %+v, want changes 254 of generation %s", i, gen)
	}
	wrapped := d.backup("--device", dev, "--output", filepath.Join(root, "wrapped"), "--since", first.Manifest)
	if i := d.cbtInfo(dev); i.Generation == gen || i.Changes != 1 {
		t.Fatalf("after take 255: %+v, want changes 1 of a new generation", i)
	}
	if !wrapped.Full || !strings.Contains(wrapped.Reason, "generation") {
		t.Fatalf("backup at take 255: %+v, want full for a new generation", wrapped)
	}
}

// TestCBTMarkDirtyFile marks the extents of a file on a mounted ext4
// (FIEMAP): the next backup's changes hold all of its blocks.
func TestCBTMarkDirtyFile(t *testing.T) {
	d := startDaemon(t)
	_, dev := d.attach(32 << 20)
	dir := mkfsMount(t, dev)
	f := filepath.Join(dir, "f")
	data := make([]byte, 600<<10)
	for i := range data {
		data[i] = byte(i * 7)
	}
	if err := os.WriteFile(f, data, 0o644); err != nil {
		t.Fatal(err)
	}
	run(t, "sync")
	store := t.TempDir()
	id, _ := d.snapshot(store, "16MiB", dev)
	before := d.cbtInfo(dev)
	d.cli("snapshot", "destroy", "--id", id)
	d.cli("cbt", "mark-dirty", "--device", dev, "--file", f)
	id, _ = d.snapshot(store, "16MiB", dev)
	defer d.cli("snapshot", "destroy", "--id", id)
	got, full := d.changedBlocks(dev, before.point(), before.BlockSize)
	changed := map[int64]bool{}
	for _, b := range got {
		changed[b] = true
	}
	// The file's blocks, by FIEMAP through filefrag's view of it.
	out := run(t, "filefrag", "-e", "-b512", f)
	var n int
	for _, line := range strings.Split(out, "\n") {
		var idx, lstart, lend, pstart, pend int64
		if _, err := fmt.Sscanf(strings.ReplaceAll(strings.ReplaceAll(line, ":", " "), "..", " "), "%d %d %d %d %d", &idx, &lstart, &lend, &pstart, &pend); err != nil {
			continue
		}
		for s := pstart; s <= pend; s += before.BlockSize / 512 {
			n++
			if !changed[s*512/before.BlockSize] {
				t.Fatalf("sector %d of %s is not in the changes %v (full %v)\n%s", s, f, got, full, out)
			}
		}
	}
	if n == 0 || full {
		t.Fatalf("filefrag found no extents, or changes were full (%v):\n%s", full, out)
	}
}
