package export

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/google/uuid"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/internal/caller"
	"github.com/ublksnap/ublksnap/nbd"
	"github.com/ublksnap/ublksnap/storage"
)

// fakeImage is an Image over bytes whose every other 64 KiB block changed
// since point 3 of its generation.
type fakeImage struct {
	*bytes.Reader
	info  cbt.Info
	ended chan struct{}
}

func newFakeImage() *fakeImage {
	return &fakeImage{Reader: bytes.NewReader(make([]byte, 1<<20)), ended: make(chan struct{}),
		info: cbt.Info{BlockSize: 64 << 10, Capacity: 1 << 20, Generation: uuid.New(), Changes: 5}}
}

func (f *fakeImage) Tracking() cbt.Info     { return f.info }
func (f *fakeImage) Ended() <-chan struct{} { return f.ended }
func (f *fakeImage) Changed(since cbt.Point, off, length int64, maxRuns int) ([]cbt.Run, error) {
	if since.Generation != f.info.Generation || since.Changes > f.info.Changes {
		return nil, cbt.ErrOtherGeneration
	}
	return []cbt.Run{{Length: 64<<10 - off%(64<<10), Changed: off>>16%2 == 1}}, nil
}

// Allocation: the second 64 KiB of every 128 KiB is a hole.
func (f *fakeImage) Allocation(off, length int64, maxSpans int) ([]storage.Span, error) {
	return []storage.Span{{Length: 64<<10 - off%(64<<10), Hole: off>>16%2 == 1}}, nil
}

func quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

func greet(t *testing.T, network, addr string) {
	t.Helper()
	c, err := net.Dial(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	b := make([]byte, 8)
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, b); err != nil || string(b) != "NBDMAGIC" {
		t.Fatalf("greeting %q, %v", b, err)
	}
}

func TestStartStopAndSnapshotEnd(t *testing.T) {
	e := New(quiet())
	defer e.Close()
	img := newFakeImage()
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	members := []Member{{Name: "disk", Device: "/dev/ublkb0", Size: 1 << 20, Image: img}}
	info, err := e.Start(context.Background(), "snap", members, Options{Listen: "unix:" + sock})
	if err != nil {
		t.Fatal(err)
	}
	want := BitmapName(cbt.Point{Generation: img.info.Generation, Changes: 4})
	if info.Address != "unix:"+sock || info.Members[0].Bitmap != want || members[0].Bitmap != "" {
		t.Fatalf("info %+v, want bitmap %s (and the caller's slice untouched)", info, want)
	}
	if fi, err := os.Stat(sock); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket: %v %v", fi, err)
	}
	greet(t, "unix", sock)
	if _, err := e.Start(context.Background(), "snap", members, Options{Listen: "unix:" + sock}); !errors.Is(err, syscall.EEXIST) {
		t.Fatalf("a second export on the same socket: %v", err)
	}
	tcp, err := e.Start(context.Background(), "snap", members, Options{Listen: "tcp:127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	greet(t, "tcp", tcp.Address[len("tcp:"):])
	if l := e.List(); len(l) != 2 {
		t.Fatalf("List: %+v", l)
	}
	if err := e.Stop("unix:" + sock); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("the socket outlives Stop: %v", err)
	}
	if err := e.Stop("unix:" + sock); !errors.Is(err, syscall.ENOENT) {
		t.Fatalf("Stop twice: %v", err)
	}
	close(img.ended) // the snapshot is destroyed
	deadline := time.Now().Add(5 * time.Second)
	for len(e.List()) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the TCP export outlives its snapshot: %+v", e.List())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if c, err := net.Dial("tcp", tcp.Address[len("tcp:"):]); err == nil {
		c.Close()
		t.Fatal("the TCP listener still accepts")
	}
}

func TestStartRefuses(t *testing.T) {
	e := New(quiet())
	defer e.Close()
	dir := t.TempDir()
	existing := filepath.Join(dir, "file")
	os.WriteFile(existing, nil, 0o600)
	members := []Member{{Name: "disk", Size: 1 << 20, Image: newFakeImage()}}
	for _, c := range []struct {
		listen  string
		members []Member
		want    error
	}{
		{"unix:" + existing, members, syscall.EEXIST},
		{"unix:relative.sock", members, syscall.EINVAL},
		{"unix:" + filepath.Join(dir, "missing", "s.sock"), members, syscall.ENOENT},
		{"tcp:192.0.2.1:10809", members, syscall.EPERM},
		{"tcp:nohostport", members, syscall.EINVAL},
		{"udp:127.0.0.1:1", members, syscall.EINVAL},
		{"unix:" + filepath.Join(dir, "s.sock"), nil, syscall.EINVAL},
		{"unix:" + filepath.Join(dir, "s.sock"), append(members, members[0]), syscall.EINVAL}, // two named disk
	} {
		if _, err := e.Start(context.Background(), "snap", c.members, Options{Listen: c.listen}); !errors.Is(err, c.want) {
			t.Errorf("Start on %s with %d members: %v, want %v", c.listen, len(c.members), err, c.want)
		}
	}
	if l := e.List(); len(l) != 0 {
		t.Fatalf("failed starts left exports: %+v", l)
	}
	if _, err := os.Stat(filepath.Join(dir, "s.sock")); !os.IsNotExist(err) {
		t.Fatalf("a failed start left its socket: %v", err)
	}
}

func TestBitmapContexts(t *testing.T) {
	img := newFakeImage()
	x := nbdExport("snap", Member{Name: "disk", Device: "/dev/ublkb0", Size: 1 << 20, Image: img})
	p := cbt.Point{Generation: img.info.Generation, Changes: 3}
	if got, ok := parseBitmapName(BitmapName(p)); !ok || got != p {
		t.Fatalf("parse(%s) = %v %v", BitmapName(p), got, ok)
	}
	alloc, err := x.Context(nbd.BaseAllocation)(64<<10, 4096)
	if err != nil || len(alloc) != 1 || alloc[0].Flags != nbd.StateHole|nbd.StateZero || alloc[0].Length != 64<<10 {
		t.Fatalf("base:allocation of a hole: %+v %v", alloc, err)
	}
	if alloc, _ := x.Context(nbd.BaseAllocation)(0, 4096); alloc[0].Flags != 0 {
		t.Fatalf("base:allocation of data: %+v", alloc)
	}
	for _, bad := range []string{
		BitmapName(cbt.Point{Generation: uuid.New(), Changes: 1}),   // another generation
		BitmapName(cbt.Point{Generation: p.Generation, Changes: 6}), // newer than the map
		"qemu:dirty-bitmap:since-", "qemu:dirty-bitmap:since-x-1", BitmapPrefix + p.Generation.String() + "-300",
		"qemu:dirty-bitmap:other",
	} {
		if x.Context(bad) != nil {
			t.Errorf("context %q offered", bad)
		}
	}
	ext, err := x.Context(BitmapName(p))(64<<10+512, 4096)
	if err != nil || len(ext) != 1 || ext[0].Flags != nbd.StateDirty || ext[0].Length != 64<<10-512 {
		t.Fatalf("bitmap extents %+v %v", ext, err)
	}
}

// Saved describes the running exports as the next daemon starts them:
// the unix socket's path and the TCP port bound, the names by device;
// TakeSaved reads back what WriteSaved wrote, once.
func TestSavedForTheNextDaemon(t *testing.T) {
	e := New(quiet())
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	members := []Member{{Name: "disk", Device: "/dev/ublkb0", Size: 1 << 20, Image: newFakeImage()}}
	if _, err := e.Start(context.Background(), "a", members, Options{Listen: "unix:" + sock}); err != nil {
		t.Fatal(err)
	}
	tcp, err := e.Start(context.Background(), "b", members, Options{Listen: "tcp:127.0.0.1:0"})
	if err != nil {
		t.Fatal(err)
	}
	saved := e.Saved()
	e.Close()
	if len(saved) != 2 {
		t.Fatalf("saved %+v, want both exports", saved)
	}
	for _, sv := range saved {
		want := map[string]string{"a": "unix:" + sock, "b": tcp.Address}[sv.Snapshot]
		if sv.Options.Listen != want || sv.Names["/dev/ublkb0"] != "disk" || len(sv.Names) != 1 {
			t.Errorf("saved %+v, want listen %s and the name by device", sv, want)
		}
	}

	path := filepath.Join(t.TempDir(), "d.exports.json")
	if got, err := TakeSaved(path); err != nil || got != nil {
		t.Fatalf("no file: %v, %v", got, err)
	}
	if err := WriteSaved(path, saved); err != nil {
		t.Fatal(err)
	}
	got, err := TakeSaved(path)
	if err != nil || len(got) != 2 || got[0].Options != saved[0].Options || got[1].Names["/dev/ublkb0"] != "disk" {
		t.Fatalf("read back %+v, %v; wrote %+v", got, err, saved)
	}
	if _, err := os.Stat(path); !os.IsNotExist(err) {
		t.Fatalf("TakeSaved left the file: %v", err)
	}
	os.WriteFile(path, []byte("[{"), 0o600)
	if _, err := TakeSaved(path); err == nil {
		t.Fatal("a damaged file read without an error")
	}

	// A socket the daemon reaches only through its caller's root (a
	// caller with another root or mount namespace): not saved.
	e = New(quiet())
	defer e.Close()
	ctx := caller.With(context.Background(), caller.Caller{Root: t.TempDir()})
	if _, err := e.Start(ctx, "c", members, Options{Listen: "unix:/nbd.sock"}); err != nil {
		t.Fatal(err)
	}
	if saved := e.Saved(); len(saved) != 0 {
		t.Fatalf("saved %+v for a socket the daemon does not see", saved)
	}
}
