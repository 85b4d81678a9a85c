package snapshot

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// crashAndRestart ends the manager as a crash would, leaving the fake
// kernel's devices and the state file as they are, and starts a second
// Manager on the same server and state file, as a restarted daemon would.
func (e *env) crashAndRestart(statePath string) {
	e.t.Helper()
	e.srv.crash()
	e.m.statePath = "" // a dead process writes nothing
	if err := e.m.Close(); err != nil {
		e.t.Fatal(err)
	}
	m, err := New(Config{Params: testParams(), Server: e.srv, Host: e.host, StatePath: statePath,
		Logger: slog.New(slog.NewTextHandler(testLog{e.t}, nil))})
	if err != nil {
		e.t.Fatal(err)
	}
	e.m = m
}

// takeSnapshot takes a snapshot of dev and returns its id.
func (e *env) takeSnapshot(dev string) string {
	e.t.Helper()
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{dev}, Storage: e.dir, Limit: 8 << 20})
	if err == nil {
		s, err = e.m.Take(bg, s.ID)
	}
	if err != nil {
		e.t.Fatalf("snapshot of %s: %v", dev, err)
	}
	return s.ID
}

func readState(t *testing.T, p string) stateFile {
	t.Helper()
	data, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var st stateFile
	if err := json.Unmarshal(data, &st); err != nil {
		t.Fatal(err)
	}
	return st
}

func TestStateFileFollowsAttachAndDetach(t *testing.T) {
	statePath := filepath.Join(t.TempDir(), "d.state.json")
	e := newEnv(t, Config{StatePath: statePath})
	a := e.attach("a.img", 1)
	b := e.attach("b.img", 2)
	st := readState(t, statePath)
	if len(st.Devices) != 2 || st.Devices[0].Queues < 1 || st.Devices[0].Depth < 1 || st.Params == nil || *st.Params != testParams() {
		t.Fatalf("state after two attaches: %+v", st)
	}
	for _, d := range e.m.devices {
		if !d.blk.(*fakeBlock).srv.kernel[d.blk.ID()].Recoverable() {
			t.Errorf("%s was not created recoverable", d.path())
		}
	}
	if err := e.m.Detach(bg, a, false); err != nil {
		t.Fatal(err)
	}
	st = readState(t, statePath)
	if len(st.Devices) != 1 || st.Devices[0].Backing != filepath.Join(e.dir, "b.img") {
		t.Fatalf("state after detaching %s (keeping %s): %+v", a, b, st)
	}
	if _, err := os.Stat(statePath + ".tmp"); !os.IsNotExist(err) {
		t.Errorf("temporary state file left behind: %v", err)
	}
}

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

// A take whose freeze hangs fails within the take timeout, and the
// filesystem is thawed once the freeze completes.
func TestTakeAbandonsAHungFreeze(t *testing.T) {
	e := newEnv(t, Config{TakeTimeout: 100 * time.Millisecond})
	a := e.attach("a.img", 1)
	e.host.hang = make(chan struct{})
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: e.dir, Limit: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := e.m.Take(bg, s.ID); !errors.Is(err, ErrBusy) {
		t.Fatalf("take with a hung freeze: %v, want ErrBusy", err)
	}
	if took := time.Since(start); took > 5*time.Second {
		t.Errorf("take with a hung freeze took %v", took)
	}
	close(e.host.hang)
	dev := e.m.devices[a].blk.DevNum()
	deadline := time.Now().Add(5 * time.Second)
	for e.host.isFrozen(dev) || !e.host.wasFrozen(dev) {
		if time.Now().After(deadline) {
			t.Fatal("the filesystem stayed frozen after the abandoned freeze completed")
		}
		time.Sleep(5 * time.Millisecond)
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
	e.m.saveLocked()
	e.m.mu.Unlock()
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

// Shutdown for good is refused while a device or an image is held, and
// accepted with force.
func TestShutdownRefusesWhileHeld(t *testing.T) {
	e := newEnv(t, Config{})
	a := e.attach("a.img", 1)
	e.host.setHolders(e.m.devices[a].blk.DevNum(), "mounted on /mnt")
	if err := e.m.Shutdown(bg, false); !errors.Is(err, ErrBusy) {
		t.Fatalf("shutdown with a mounted device: %v, want ErrBusy", err)
	}
	select {
	case <-e.m.ShutdownRequested():
		t.Fatal("a refused shutdown was signalled")
	default:
	}
	if err := e.m.Shutdown(bg, true); err != nil {
		t.Fatal(err)
	}
	select {
	case <-e.m.ShutdownRequested():
	default:
		t.Fatal("an accepted shutdown was not signalled")
	}
}

// Leave (SIGTERM) keeps the filtered devices for the next daemon and
// reports a snapshot that was not taken lost.
func TestLeaveKeepsDevicesAndLosesSnapshots(t *testing.T) {
	statePath := filepath.Join(t.TempDir(), "d.state.json")
	e := newEnv(t, Config{StatePath: statePath})
	a := e.attach("a.img", 1)
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: e.dir, Limit: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	id := s.ID
	dev := e.m.devices[a].blk.(*fakeBlock)
	if err := e.m.Leave(); err != nil {
		t.Fatal(err)
	}
	if dev.closed {
		t.Fatal("Leave stopped the filtered device")
	}
	if n := len(e.srv.kernel); n != 1 {
		t.Errorf("%d devices left in the kernel, want the filtered one only", n)
	}
	st := readState(t, statePath)
	if len(st.Devices) != 1 || len(st.Snapshots) != 1 || st.Snapshots[0].ID != id || !st.Snapshots[0].Lost {
		t.Errorf("state after Leave: %+v, want the device and snapshot %s lost", st, id)
	}
}

// A taken snapshot whose storage is a named file, or an unnamed one in a
// directory, survives a planned restart: the image shows the same data,
// later writes to the original keep it so, and destroy works. The name an
// unnamed file gets for the handover is gone once the next daemon has it.
func TestSnapshotSurvivesPlannedRestart(t *testing.T) {
	for _, named := range []bool{true, false} {
		t.Run(fmt.Sprintf("named=%v", named), func(t *testing.T) { testSnapshotSurvivesPlannedRestart(t, named) })
	}
}

func testSnapshotSurvivesPlannedRestart(t *testing.T, named bool) {
	statePath := filepath.Join(t.TempDir(), "d.state.json")
	e := newEnv(t, Config{StatePath: statePath})
	a := e.attach("a.img", 1)
	storeDir := t.TempDir()
	store := storeDir
	if named {
		store = filepath.Join(storeDir, "store")
	}
	s, err := e.m.CreateSnapshot(bg, CreateOptions{Devices: []string{a}, Storage: store, Limit: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.m.Take(bg, s.ID); err != nil {
		t.Fatal(err)
	}
	write := func(off int64, fill byte) {
		t.Helper()
		buf := bytes.Repeat([]byte{fill}, 64<<10)
		if err := e.m.devices[a].orig.Write(bg, off, buf, false); err != nil {
			t.Fatal(err)
		}
	}
	image := func() []byte {
		t.Helper()
		mb := e.m.snapshots[s.ID].members[0]
		buf := make([]byte, mb.area.Size())
		if err := mb.area.ReadImage(bg, buf, 0, false); err != nil {
			t.Fatal(err)
		}
		return buf
	}
	write(0, 7)
	write(1<<20, 8)
	before := image()
	if before[0] != 1 || before[1<<20] != 1 {
		t.Fatal("the image does not show the data of the take")
	}

	if err := e.m.Leave(); err != nil {
		t.Fatal(err)
	}
	if !named {
		if names := dirNames(t, storeDir); len(names) != 1 || !strings.HasPrefix(names[0], ".ublksnap-"+s.ID) {
			t.Fatalf("after Leave the storage directory holds %v, want the unnamed file's handover name", names)
		}
	}
	e.crashAndRestart(statePath) // the process exits after Leave
	rep, err := e.m.Recover(bg)
	if err != nil {
		t.Fatal(err)
	}
	if len(rep.Recovered) != 1 {
		t.Fatalf("recovered %+v", rep)
	}
	if names := dirNames(t, storeDir); !named && len(names) != 0 {
		t.Errorf("after the restart the storage directory holds %v, want nothing", names)
	}
	info, err := e.m.Snapshot(bg, s.ID)
	if err != nil || info.State != StateTaken || info.Members[0].Image == "" {
		t.Fatalf("snapshot after the restart: %+v, %v; want taken with an image", info, err)
	}
	if !bytes.Equal(image(), before) {
		t.Fatal("the image after the restart differs from before")
	}
	if e.m.snapshots[s.ID].members[0].area.BufferBudget() != e.m.buffers {
		t.Error("the restored area does not draw on the manager's buffer budget")
	}
	write(0, 9)
	write(2<<20, 9)
	if !bytes.Equal(image(), before) {
		t.Fatal("writes to the original after the restart changed the image")
	}
	if err := e.m.Destroy(bg, s.ID, false); err != nil {
		t.Fatal(err)
	}
	if names := dirNames(t, storeDir); len(names) != 0 {
		t.Errorf("destroy left %v in the storage directory", names)
	}
}

// dirNames lists the names in dir.
func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	return names
}
