package snapshot

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/ublk"
)

// handlerOf returns the handler serving node.
func (e *env) handlerOf(node string) (ublk.Handler, []int) {
	e.t.Helper()
	e.srv.mu.Lock()
	defer e.srv.mu.Unlock()
	for _, b := range e.srv.served {
		if b.path == node && !b.closed {
			return b.h, b.files
		}
	}
	e.t.Fatalf("%s is not served", node)
	return nil, nil
}

// do sends a request to node as ublk would: on the queue goroutine first,
// again on a worker if that would block, then waits for it.
func (e *env) do(node string, op ublk.Op, off int64, buf []byte) {
	e.t.Helper()
	h, files := e.handlerOf(node)
	r := ublk.NewRequest(op, 0, off, len(buf), buf, true, nil)
	if err := ublk.Run(h, r, files); err != nil {
		e.t.Fatalf("%v of %s at %d: %v", op, node, off, err)
	}
}

// changedSince returns the extents of dev changed since p.
func (e *env) changedSince(dev string, p cbt.Point) ([]cbt.Extent, bool) {
	e.t.Helper()
	rm, info, err := e.m.CBTMap(dev)
	if err != nil {
		e.t.Fatal(err)
	}
	return cbt.Changed(rm, info, p)
}

func point(info cbt.Info) cbt.Point {
	return cbt.Point{Generation: info.Generation, Changes: info.Changes}
}

func TestCBTFollowsWritesTakesAndImages(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.attach("a.img", 1)
	bs := int64(1) << testParams().TrackingBlockMinimumShift
	// Tracking starts at attach, before any snapshot.
	e.do(a, ublk.OpWrite, 0, make([]byte, 4096))
	e.do(a, ublk.OpDiscard, 3*bs, make([]byte, 2*bs))
	e.do(a, ublk.OpWriteZeroes, 4<<20-512, make([]byte, 512))
	before, _ := e.m.CBTInfo(a)
	id := e.takeSnapshot(a)
	first, _ := e.m.CBTInfo(a)
	if first.Changes != before.Changes+1 || first.Generation != before.Generation {
		t.Fatalf("take: %+v, before %+v", first, before)
	}
	got, full := e.changedSince(a, cbt.Point{Generation: first.Generation})
	last := (4<<20 - 1) / bs * bs
	want := []cbt.Extent{{Offset: 0, Length: bs}, {Offset: 3 * bs, Length: 2 * bs}, {Offset: last, Length: 4<<20 - last}}
	if full || !reflect.DeepEqual(got, want) {
		t.Fatalf("changed before the first take: %v (full %v), want %v", got, full, want)
	}
	// While the snapshot is held: a write to the original counts in the
	// next interval, a write to the image in this one and the next.
	e.do(a, ublk.OpWrite, 6*bs, make([]byte, 4096))
	image := e.m.snapshots[id].members[0].image.Path()
	e.do(image, ublk.OpWrite, 8*bs, make([]byte, 4096))
	if err := e.m.MarkDirty(a, []cbt.Extent{{Offset: 10 * bs, Length: 1}, {Offset: 12 * bs, Length: bs}}); err != nil {
		t.Fatal(err)
	}
	got, _ = e.changedSince(a, point(before))
	want = append(want[:2:2], cbt.Extent{Offset: 8 * bs, Length: bs}, cbt.Extent{Offset: 10 * bs, Length: bs},
		cbt.Extent{Offset: 12 * bs, Length: bs}, want[2])
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("this backup after image writes and dirty ranges: %v, want %v", got, want)
	}
	if err := e.m.Destroy(bg, id, false); err != nil {
		t.Fatal(err)
	}
	e.takeSnapshot(a)
	got, _ = e.changedSince(a, point(first))
	want = []cbt.Extent{{Offset: 6 * bs, Length: bs}, {Offset: 8 * bs, Length: bs}, {Offset: 10 * bs, Length: bs}, {Offset: 12 * bs, Length: bs}}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("next backup: %v, want %v", got, want)
	}
}

func TestMarkDirtyChecksEveryRangeFirst(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.attach("a.img", 1)
	e.takeSnapshot(a)
	info, _ := e.m.CBTInfo(a)
	err := e.m.MarkDirty(a, []cbt.Extent{{Offset: 0, Length: 4096}, {Offset: 4 << 20, Length: 1}})
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("a range past the end: %v", err)
	}
	if got, _ := e.changedSince(a, point(info)); len(got) != 0 {
		t.Fatalf("a refused mark-dirty marked %v", got)
	}
	if _, err := e.m.CBTInfo("/dev/nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown device: %v", err)
	}
}

func TestCBTSurvivesPlannedRestartNotCrash(t *testing.T) {
	statePath := filepath.Join(t.TempDir(), "d.state.json")
	e := newEnv(t, Config{StatePath: statePath})
	a := e.attach("a.img", 1)
	e.takeSnapshot(a) // Leave keeps it; it is destroyed with the manager
	e.do(a, ublk.OpWrite, 1<<20, make([]byte, 4096))
	before, _ := e.m.CBTInfo(a)
	rmBefore, _, _ := e.m.CBTMap(a)
	if err := e.m.Leave(); err != nil {
		t.Fatal(err)
	}
	e.crashAndRestart(statePath)
	if _, err := e.m.Recover(bg); err != nil {
		t.Fatal(err)
	}
	after, _ := e.m.CBTInfo(a)
	rmAfter, _, _ := e.m.CBTMap(a)
	if after != before || !reflect.DeepEqual(rmAfter, rmBefore) {
		t.Fatalf("after a planned restart: %+v, before %+v", after, before)
	}
	// The write made before the restart counts in the next backup.
	for id := range e.m.snapshots {
		if err := e.m.Destroy(bg, id, false); err != nil {
			t.Fatal(err)
		}
	}
	e.takeSnapshot(a)
	if got, _ := e.changedSince(a, point(before)); len(got) != 1 || got[0].Offset != 1<<20 {
		t.Fatalf("changed across the restart: %v", got)
	}
	// A crash: the map is gone, a new generation starts.
	e.crashAndRestart(statePath)
	if _, err := e.m.Recover(bg); err != nil {
		t.Fatal(err)
	}
	if info, _ := e.m.CBTInfo(a); info.Generation == before.Generation {
		t.Fatal("the generation survived a crash")
	}
}

func TestCBTSurvivesDetachAttachOfAnUnchangedFile(t *testing.T) {
	statePath := filepath.Join(t.TempDir(), "d.state.json")
	e := newEnv(t, Config{StatePath: statePath})
	a := e.attach("a.img", 1)
	backing := filepath.Join(e.dir, "a.img")
	e.do(a, ublk.OpWrite, 0, make([]byte, 4096))
	e.takeSnapshot(a)
	for id := range e.m.snapshots {
		if err := e.m.Destroy(bg, id, false); err != nil {
			t.Fatal(err)
		}
	}
	before, _ := e.m.CBTInfo(a)
	reattach := func() cbt.Info {
		t.Helper()
		if err := e.m.Detach(bg, a, false); err != nil {
			t.Fatal(err)
		}
		d, err := e.m.Attach(bg, AttachOptions{Backing: backing})
		if err != nil {
			t.Fatal(err)
		}
		a = d.Path
		info, _ := e.m.CBTInfo(a)
		return info
	}
	if info := reattach(); info != before {
		t.Fatalf("after detach and attach: %+v, before %+v", info, before)
	}
	// Written while detached: a new generation.
	if err := e.m.Detach(bg, a, false); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(backing, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{9}, 100)
	f.Close()
	d, err := e.m.Attach(bg, AttachOptions{Backing: backing})
	if err != nil {
		t.Fatal(err)
	}
	if info, _ := e.m.CBTInfo(d.Path); info.Generation == before.Generation {
		t.Fatal("a file written while detached kept its generation")
	}
}
