package main

import (
	"bytes"
	"context"
	"errors"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

func TestStretcherHonoursLimit(t *testing.T) {
	s := &stretcher{dir: t.TempDir(), limit: 3 << 20}
	var paths []string
	for i := 0; i < 4; i++ {
		p, err := s.grow(2 << 20)
		if err != nil {
			t.Fatal(err)
		}
		if p != "" {
			paths = append(paths, p)
		}
	}
	if len(paths) != 2 || s.used != 3<<20 {
		t.Fatalf("grew %d files, %d bytes; want 2 files and exactly the 3 MiB limit", len(paths), s.used)
	}
}

// Two watches over one directory, or a watch run again, never reuse a
// name, and each removes the files it made when it ends.
func TestStretcherNamesAndCleanup(t *testing.T) {
	dir := t.TempDir()
	const id = "0b0c3f53-5a47-4a50-8e0e-3e6bd0e3bd1a"
	first := &stretcher{id: id, dir: dir, limit: 8 << 20}
	p1, err := first.grow(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	// A second run for the same snapshot while the first's file exists.
	again := &stretcher{id: id, dir: dir, limit: 8 << 20}
	p2, err := again.grow(1 << 20)
	if err != nil || p2 == p1 {
		t.Fatalf("second run: %q, %v; want a new name beside %q", p2, err, p1)
	}
	other := &stretcher{id: "11111111-2222-3333-4444-555555555555", dir: dir, limit: 8 << 20}
	p3, err := other.grow(1 << 20)
	if err != nil || p3 == p1 || p3 == p2 {
		t.Fatalf("another snapshot: %q, %v", p3, err)
	}
	keep := filepath.Join(dir, "user-file")
	os.WriteFile(keep, []byte("mine"), 0o600)
	for _, s := range []*stretcher{first, again, other} {
		if err := s.removeAll(); err != nil {
			t.Fatal(err)
		}
	}
	left, _ := os.ReadDir(dir)
	if len(left) != 1 || left[0].Name() != "user-file" {
		t.Errorf("left in the directory: %v, want only the user's file", left)
	}
}

// fakeDaemon answers a watch's requests from a script.
type fakeDaemon struct {
	t         *testing.T
	events    []fakeEvent // WaitEvent's answers in turn; after them, the snapshot is gone
	appendErr error       // AppendStorage's answer
	appended  []string    // the paths appended, each an existing file then
}

// fakeEvent is one answer to WaitEvent; cancel, if set, is called first.
type fakeEvent struct {
	e      api.Event
	err    error
	cancel context.CancelFunc
}

// errGone is the daemon's answer about a destroyed snapshot.
var errGone = &api.Error{Status: http.StatusNotFound, Code: api.CodeNotFound, Message: "not found: snapshot was destroyed"}

func (f *fakeDaemon) WaitEvent(ctx context.Context, _ string, _ time.Duration) (api.Event, error) {
	if len(f.events) == 0 {
		return api.Event{}, errGone
	}
	next := f.events[0]
	f.events = f.events[1:]
	if next.cancel != nil {
		next.cancel()
		return api.Event{}, ctx.Err()
	}
	return next.e, next.err
}

func (f *fakeDaemon) AppendStorage(_ context.Context, _ string, req api.AppendStorageRequest) (api.Snapshot, error) {
	if fi, err := os.Stat(req.Path); err != nil || !filepath.IsAbs(req.Path) || fi.Size() == 0 {
		f.t.Errorf("append of %q: %v; want an absolute path to an allocated file", req.Path, err)
	}
	f.appended = append(f.appended, req.Path)
	return api.Snapshot{}, f.appendErr
}

// low is a low_free_space event asking for 2 MiB.
var low = fakeEvent{e: api.Event{Code: api.EventLowFreeSpace, RequestedSectors: 4096}}

// runWatch runs a watch of a fake snapshot with a 64 MiB --grow-dir of its
// own and returns what it printed, the directory and its error.
func runWatch(t *testing.T, f *fakeDaemon) (string, string, error) {
	t.Helper()
	f.t = t
	dir := t.TempDir()
	var out bytes.Buffer
	const id = "0b0c3f53-5a47-4a50-8e0e-3e6bd0e3bd1a"
	w := &watch{daemon: f, id: id, grow: &stretcher{id: id, dir: dir, limit: 64 << 20}, out: &out, errOut: &out}
	err := w.run(context.Background())
	return out.String(), dir, err
}

// A watch answers each low_free_space with a new file, and removes its
// files when the daemon says the snapshot is gone.
func TestWatchGrowsAndRemovesItsFiles(t *testing.T) {
	f := &fakeDaemon{events: []fakeEvent{low, {e: api.Event{Code: api.EventTimeout}}, low}}
	out, dir, err := runWatch(t, f)
	if err != nil {
		t.Fatalf("watch: %v\n%s", err, out)
	}
	if len(f.appended) != 2 || f.appended[0] == f.appended[1] || !strings.Contains(filepath.Base(f.appended[0]), "0b0c3f53") {
		t.Errorf("appended %q; want two files named after the snapshot", f.appended)
	}
	if n := strings.Count(out, "low_free_space"); n != 2 || !strings.Contains(out, "is gone") {
		t.Errorf("watch printed %d events:\n%s", n, out)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 0 {
		t.Errorf("left behind: %q", left)
	}
}

// The snapshot may be destroyed between an event and the file that
// answers it: that ends the watch as well, not as a failure.
func TestWatchEndsWhenTheSnapshotGoesDuringAnAppend(t *testing.T) {
	f := &fakeDaemon{events: []fakeEvent{low, low}, appendErr: errGone}
	out, dir, err := runWatch(t, f)
	if err != nil || len(f.appended) != 1 {
		t.Fatalf("watch: %v after %d appends; want it to end quietly after the first\n%s", err, len(f.appended), out)
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 0 {
		t.Errorf("left behind: %q", left)
	}
}

// Only the daemon's not_found ends a watch quietly: any other failure (a
// 404 without it comes from something that is not a ublksnap daemon of
// this version) is an error, and the files go all the same.
func TestWatchFailsOnOtherErrorsAndCleansUp(t *testing.T) {
	for _, fail := range []error{
		&api.Error{Status: http.StatusNotFound, Message: "404 page not found"},
		&api.Error{Status: http.StatusInternalServerError, Code: api.CodeInternal, Message: "broken"},
		errors.New("connection reset"),
	} {
		f := &fakeDaemon{events: []fakeEvent{low, {err: fail}}}
		out, dir, err := runWatch(t, f)
		if !errors.Is(err, fail) {
			t.Errorf("wait-event failing with %q: watch returned %v; want that error\n%s", fail, err, out)
		}
		if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 0 {
			t.Errorf("%q: left behind: %q", fail, left)
		}
	}
}

// Interrupted (Ctrl-C), a watch ends without error and removes its files.
func TestWatchInterrupted(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	f := &fakeDaemon{t: t, events: []fakeEvent{low, {cancel: cancel}}}
	dir := t.TempDir()
	var out bytes.Buffer
	w := &watch{daemon: f, id: "x", grow: &stretcher{id: "x", dir: dir, limit: 64 << 20}, out: &out, errOut: &out, json: true}
	if err := w.run(ctx); err != nil {
		t.Fatalf("interrupted watch: %v", err)
	}
	if len(f.appended) != 1 || !strings.Contains(out.String(), `"code": "low_free_space"`) {
		t.Errorf("appended %q, printed %s", f.appended, out.String())
	}
	if left, _ := filepath.Glob(filepath.Join(dir, "*")); len(left) != 0 {
		t.Errorf("left behind: %q", left)
	}
}
