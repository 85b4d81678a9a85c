package snapshot

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

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

// Leave pauses every device at once: a request that never leaves costs
// the restart one pause timeout, not one per device.
func TestLeavePausesDevicesTogether(t *testing.T) {
	statePath := filepath.Join(t.TempDir(), "d.state.json")
	// Paused one after the other the three would take 3 × timeout at
	// least; together, one timeout and the work: the bound lies between
	// with 1.5 timeouts of room for a slow machine.
	const timeout = 2 * time.Second
	e := newEnv(t, Config{StatePath: statePath, DestroyTimeout: timeout})
	var stuck []*gate
	for _, name := range []string{"a.img", "b.img", "c.img"} {
		g := e.m.devices[e.attach(name, 1)].gate
		if !g.TryEnter() { // a request in flight that does not leave
			t.Fatal("an open gate refused TryEnter")
		}
		stuck = append(stuck, g)
	}
	start := time.Now()
	if err := e.m.Leave(); err != nil {
		t.Fatal(err)
	}
	if took := time.Since(start); took > 3*timeout-timeout/2 {
		t.Fatalf("Leave with 3 devices each holding a request took %v; one pause timeout is %v", took, timeout)
	}
	for _, g := range stuck {
		g.Leave()
	}
	e.crashAndRestart(statePath)
}
