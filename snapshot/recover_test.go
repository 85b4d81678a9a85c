package snapshot

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// After a crash, a successor serves the recorded devices again, deletes
// the images and stale devices of ours, and leaves others' alone.
func TestRecoverAfterCrash(t *testing.T) {
	statePath := filepath.Join(t.TempDir(), "d.state.json")
	e := newEnv(t, Config{StatePath: statePath})
	a := e.attach("a.img", 1)
	e.attach("b.img", 2)
	store := filepath.Join(e.dir, "store")
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: store, Limit: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	id := s.ID
	if _, err := e.m.Take(bg, id); err != nil {
		t.Fatal(err)
	}
	e.srv.mu.Lock()
	e.srv.kernel[90] = &ublk.Info{ID: 90, State: ublk.StateQuiesced, Owner: 0x1234, Flags: 1 << 3}    // someone else's
	e.srv.kernel[91] = &ublk.Info{ID: 91, State: ublk.StateQuiesced, Owner: e.m.owner, Flags: 1 << 3} // ours, unrecorded
	e.srv.mu.Unlock()
	image := e.m.snapshots[id].members[0].image.ID()
	e.crashAndRestart(statePath)

	rep, err := e.m.Recover(bg)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, d := range rep.Recovered {
		got = append(got, d.Path)
	}
	slices.Sort(got)
	if len(got) != 2 || got[0] != a || len(rep.Failed) != 0 {
		t.Fatalf("recovered %v, failed %v; want %s and the other device", got, rep.Failed, a)
	}
	slices.Sort(rep.Removed)
	if !slices.Equal(rep.Removed, []int{image, 91}) {
		t.Errorf("removed %v, want the image %d and the stale device 91", rep.Removed, image)
	}
	if _, ok := e.srv.kernel[90]; !ok {
		t.Error("another owner's device was deleted")
	}
	st := e.m.Status(bg)
	if len(st.Devices) != 2 || len(st.Snapshots) != 1 || st.Snapshots[0].ID != id || st.Snapshots[0].State != StateLost {
		t.Errorf("status after recovery: %+v, want two devices and snapshot %s lost", st, id)
	}
	if _, err := os.Stat(store); !os.IsNotExist(err) {
		t.Errorf("the lost snapshot's storage file %s is still there: %v", store, err)
	}
	if ds, err := e.m.DeviceState(bg, a); err != nil || ds.State != StateLost || ds.Snapshot != id || ds.Errno != ErrnoLost {
		t.Errorf("device state of %s: %+v, %v; want lost with %v", a, ds, err, ErrnoLost)
	}
	if ev, err := e.m.WaitEvent(bg, id, 0); err != nil || ev.Code != storage.EventCorrupted || ev.Errno != ErrnoLost || ev.Device != a {
		t.Errorf("event of the lost snapshot: %+v, %v", ev, err)
	}
	if _, err := e.m.Take(bg, id); !errors.Is(err, ErrLost) || Errno(err) != ErrnoLost {
		t.Errorf("take of a lost snapshot: %v, want ErrLost", err)
	}
	// The recovered devices serve through a fresh COW engine: a new
	// snapshot can be taken.
	e.takeSnapshot(a)
	// A second restart still reports it; destroy forgets it.
	e.crashAndRestart(statePath)
	if _, err := e.m.Recover(bg); err != nil {
		t.Fatal(err)
	}
	if ids := e.m.Snapshots(bg); len(ids) != 2 || !slices.Contains(ids, id) {
		t.Fatalf("snapshots after a second crash: %v, want %s and the one taken since", ids, id)
	}
	if err := e.m.Destroy(bg, id, false); err != nil {
		t.Fatal(err)
	}
	if ids := e.m.Snapshots(bg); len(ids) != 1 || slices.Contains(ids, id) {
		t.Errorf("snapshots after destroying the lost one: %v", ids)
	}
	if st := readState(t, statePath); len(st.Snapshots) != 1 {
		t.Errorf("state after destroying the lost snapshot: %+v", st.Snapshots)
	}
}

// A backing replaced while no daemon ran is not served again: the device
// is deleted and reported.
func TestRecoverRefusesAReplacedBacking(t *testing.T) {
	statePath := filepath.Join(t.TempDir(), "d.state.json")
	e := newEnv(t, Config{StatePath: statePath})
	e.attach("a.img", 1)
	p := filepath.Join(e.dir, "a.img")
	if err := os.Remove(p); err != nil {
		t.Fatal(err)
	}
	e.file("a.img", 4<<20, 9)
	e.crashAndRestart(statePath)
	rep, err := e.m.Recover(bg)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Recovered) != 0 || len(rep.Failed) != 1 || !errors.Is(rep.Failed[0].Err, ErrConflict) {
		t.Fatalf("report %+v, want one failure (ErrConflict)", rep)
	}
	if len(e.srv.kernel) != 0 {
		t.Errorf("the unrecoverable device was left in the kernel: %v", e.srv.kernel)
	}
	if u := e.m.Status(bg).Unrecovered; len(u) != 1 || u[0].Backing != p || !errors.Is(u[0].Err, ErrConflict) {
		t.Errorf("status lists as not recovered %+v, want %s", u, p)
	}
	if st := readState(t, statePath); len(st.Devices) != 0 {
		t.Errorf("state still records %+v", st.Devices)
	}
}

// A damaged state file stops the daemon before it touches any device.
func TestRecoverWithDamagedStateTouchesNothing(t *testing.T) {
	statePath := filepath.Join(t.TempDir(), "d.state.json")
	e := newEnv(t, Config{StatePath: statePath})
	e.attach("a.img", 1)
	e.crashAndRestart(statePath)
	if err := os.WriteFile(statePath, []byte("{\"version\": 1, \"devi"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := e.m.Recover(context.Background())
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("recover with a damaged state file: %v, want ErrInvalid", err)
	}
	if len(e.srv.removed) != 0 || len(e.srv.kernel) != 1 {
		t.Errorf("devices touched: removed %v, kernel %v", e.srv.removed, e.srv.kernel)
	}
}

// A daemon that died between freeze and thaw leaves the filesystems
// frozen; the next one thaws them.
func TestRecoverThawsWhatATakeLeftFrozen(t *testing.T) {
	statePath := filepath.Join(t.TempDir(), "d.state.json")
	e := newEnv(t, Config{StatePath: statePath})
	a := e.attach("a.img", 1)
	dev := e.m.devices[a].blk.DevNum()
	// The moment of the crash: frozen, recorded as freezing.
	e.host.Freeze(bg, dev)
	e.m.mu.Lock()
	e.m.freezing = []string{a}
	e.m.unlockSaving()
	e.crashAndRestart(statePath)
	if _, err := e.m.Recover(bg); err != nil {
		t.Fatal(err)
	}
	if e.host.isFrozen(dev) {
		t.Fatal("the filesystem a take left frozen is still frozen after the restart")
	}
	if st := readState(t, statePath); len(st.Freezing) != 0 {
		t.Errorf("state still says freezing: %v", st.Freezing)
	}
}
