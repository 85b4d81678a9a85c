//go:build vmtest

package integration

import (
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// reqKind sorts requests by what they may wait for.
type reqKind int

const (
	kindRead reqKind = iota
	kindWrite
	kindFUA
	kindFlush
	kindOther
	nKinds
)

func kindOf(r *ublk.Request) reqKind {
	switch {
	case r.Op == ublk.OpRead:
		return kindRead
	case r.Op == ublk.OpWrite && r.Flags&ublk.FlagFUA != 0:
		return kindFUA
	case r.Op == ublk.OpWrite:
		return kindWrite
	case r.Op == ublk.OpFlush:
		return kindFlush
	}
	return kindOther
}

// queueWatch counts, per kind of request, what the handler did on the
// queue thread (served it, or left it to a worker) and on the workers, and
// passes the outcome of the ring I/O on to the handler's Finish.
type queueWatch struct {
	inner    ublk.Handler
	served   [nKinds]atomic.Int64 // served on the queue thread
	deferred [nKinds]atomic.Int64 // answered would-block on the queue thread
	worker   [nKinds]atomic.Int64 // served on a worker
}

func (w *queueWatch) Handle(r *ublk.Request) error {
	k := kindOf(r)
	err := w.inner.Handle(r)
	switch {
	case !r.NoWait():
		w.worker[k].Add(1)
	case errors.Is(err, ublk.ErrWouldBlock) || errors.Is(err, syscall.EAGAIN):
		w.deferred[k].Add(1)
	default:
		w.served[k].Add(1)
	}
	return err
}

func (w *queueWatch) Finish(r *ublk.Request, err error) error {
	if f, ok := w.inner.(ublk.Finisher); ok {
		return f.Finish(r, err)
	}
	return err
}

// delayedDevice makes a device-mapper device over the block device dev
// whose first half is linear and whose second half delays every read by
// ms milliseconds (dm-delay), and returns its node.
func delayedDevice(t *testing.T, dev string, ms int) string {
	t.Helper()
	if out, _ := exec.Command("dmsetup", "targets").Output(); !strings.Contains(string(out), "delay") {
		if out, err := exec.Command("modprobe", "dm_delay").CombinedOutput(); err != nil {
			t.Fatalf("no dm-delay target and modprobe dm_delay: %v: %s", err, out)
		}
	}
	sectors := blockSectors(t, dev)
	half := sectors / 2
	name := fmt.Sprintf("ublksnap-delay-%d", os.Getpid())
	table := fmt.Sprintf("0 %d linear %s 0\n%d %d delay %s %d %d %s %d 0\n", half, dev, half, sectors-half, dev, half, ms, dev, half)
	cmd := exec.Command("dmsetup", "create", name)
	cmd.Stdin = strings.NewReader(table)
	cmd.Env = append(os.Environ(), "DM_DISABLE_UDEV=1")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("dmsetup create %s: %v: %s", name, err, out)
	}
	t.Cleanup(func() {
		rm := exec.Command("dmsetup", "remove", "--retry", name)
		rm.Env = append(os.Environ(), "DM_DISABLE_UDEV=1")
		if out, err := rm.CombinedOutput(); err != nil {
			t.Errorf("dmsetup remove %s: %v: %s", name, err, out)
		}
	})
	return "/dev/mapper/" + name
}

// blockSectors returns the size of a block device in sectors.
func blockSectors(t *testing.T, dev string) int64 {
	t.Helper()
	f, err := os.Open(dev)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		t.Fatal(err)
	}
	return n >> 9
}

// TestUblkQueueThreadNeverWaits (defect 6, and the ring I/O of issue 19)
// serves a pass-through device with one queue over a backing whose second
// half answers reads only after 8 s (dm-delay over a loop device). Every
// request is served as backing I/O on the queue's ring, none on a worker
// (FUA writes and flushes included), and while a read of the slow half is
// stuck in the backing, reads and writes of the fast half go on through
// the same queue.
func TestUblkQueueThreadNeverWaits(t *testing.T) {
	loop := loopDevice(t, tempFile(t, 32<<20))
	slow := delayedDevice(t, loop, 8000)
	var w *queueWatch
	d, _ := ublkDeviceOver(t, slow, 1, 32, storage.OpenOptions{}, func(h ublk.Handler, _ *storage.File) ublk.Handler {
		w = &queueWatch{inner: h}
		return w
	})
	// O_DIRECT|O_SYNC writes reach ublk as FUA writes; fsync as flushes.
	fio(t, "--name=fua", "--filename="+d.Path(), "--rw=randwrite", "--bs=4k", "--size=4M",
		"--direct=1", "--sync=1", "--fsync=16", "--ioengine=psync",
		"--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
	for _, k := range []struct {
		name string
		kind reqKind
	}{{"read", kindRead}, {"FUA write", kindFUA}, {"flush", kindFlush}} {
		if n := w.worker[k.kind].Load() + w.deferred[k.kind].Load(); n != 0 {
			t.Errorf("%s: %d left to a worker, want 0 (all as ring I/O)", k.name, n)
		}
		if w.served[k.kind].Load() == 0 {
			t.Errorf("%s: none served", k.name)
		}
	}

	// A read of the slow half, stuck for 8 s in dm-delay.
	slowRead := exec.Command("dd", "if="+d.Path(), "of=/dev/null", "bs=4k", "count=1", "skip=6144", "iflag=direct")
	var slowOut strings.Builder
	slowRead.Stdout, slowRead.Stderr = &slowOut, &slowOut
	start := time.Now()
	if err := slowRead.Start(); err != nil {
		t.Fatal(err)
	}
	slowDone := make(chan error, 1)
	go func() { slowDone <- slowRead.Wait() }()
	// Requests of the fast half meanwhile, through the same queue.
	fio(t, "--name=fast", "--filename="+d.Path(), "--rw=randrw", "--bs=4k", "--size=4M",
		"--direct=1", "--ioengine=psync", "--number_ios=64")
	fastTook := time.Since(start)
	select {
	case err := <-slowDone:
		t.Fatalf("the slow read ended (%v: %s) before the fast requests could be checked", err, slowOut.String())
	default:
	}
	if err := <-slowDone; err != nil {
		t.Fatalf("slow read: %v: %s", err, slowOut.String())
	}
	slowTook := time.Since(start)
	t.Logf("64 fast requests done %v after the slow read started; the slow read took %v", fastTook, slowTook)
	if slowTook < 7*time.Second {
		t.Errorf("the slow read took %v: dm-delay did not hold it", slowTook)
	}
}
