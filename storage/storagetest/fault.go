// Package storagetest provides backing devices for tests of ublksnap's
// storage and chunk engine: a wrapper that injects errors, delays, hangs
// and panics, one operation kind at a time (as pebble's errorfs), and a
// device that reads zeros and drops writes, to stand for huge devices.
package storagetest

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ublksnap/ublksnap/storage"
)

// ErrInjected is the default injected error; use a syscall.Errno to test
// errno propagation.
var ErrInjected = errors.New("storagetest: injected fault")

// Op is a kind of device operation.
type Op int

// Operation kinds.
const (
	OpRead Op = iota
	OpWrite
	OpFlush
	OpDiscard
	OpWriteZeroes
	OpGrow
	numOps
)

func (op Op) String() string {
	return [...]string{"read", "write", "flush", "discard", "write-zeroes", "grow"}[op]
}

// fault is an injected failure: operations after the first after ones fail
// with err.
type fault struct {
	after int64
	err   error
}

// FaultDevice wraps a Device, counting operations per kind and injecting
// errors, delays, hangs and panics. It forwards the optional interfaces the
// wrapped device has (Grow fails on a device that cannot grow).
type FaultDevice struct {
	storage.Device

	counts  [numOps]atomic.Int64 // operations seen per kind
	hanging [numOps]atomic.Int64 // operations blocked by Hang now, per kind

	mu     sync.Mutex
	faults [numOps]*fault        // guarded by mu
	delays [numOps]time.Duration // guarded by mu
	hangs  [numOps]chan struct{} // closed to end a Hang; guarded by mu
	panics [numOps]any           // the value operations panic with; guarded by mu
}

// NewFaultDevice wraps dev without faults.
func NewFaultDevice(dev storage.Device) *FaultDevice { return &FaultDevice{Device: dev} }

// Fail makes every operation of kind op after the first after ones fail
// with err (ErrInjected if nil). A nil-err call with after < 0 clears it.
func (d *FaultDevice) Fail(op Op, after int64, err error) {
	if err == nil {
		err = ErrInjected
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if after < 0 {
		d.faults[op] = nil
		return
	}
	d.faults[op] = &fault{after: d.counts[op].Load() + after, err: err}
}

// Delay makes every operation of kind op sleep for delay first.
func (d *FaultDevice) Delay(op Op, delay time.Duration) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.delays[op] = delay
}

// Hang makes every operation of kind op block, as on a hung disk, until
// release is called; the operations then go on as usual. release may be
// called more than once.
func (d *FaultDevice) Hang(op Op) (release func()) {
	ch := make(chan struct{})
	d.mu.Lock()
	d.hangs[op] = ch
	d.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			d.mu.Lock()
			if d.hangs[op] == ch {
				d.hangs[op] = nil
			}
			d.mu.Unlock()
			close(ch)
		})
	}
}

// Hanging returns the number of operations of kind op blocked by Hang now.
func (d *FaultDevice) Hanging(op Op) int64 { return d.hanging[op].Load() }

// Panic makes every operation of kind op panic with v, as a bug under the
// caller would; a nil v stops it.
func (d *FaultDevice) Panic(op Op, v any) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.panics[op] = v
}

// Count returns the number of operations of kind op seen.
func (d *FaultDevice) Count(op Op) int64 { return d.counts[op].Load() }

// begin counts an operation, sleeps its delay, blocks while it is hung,
// panics if told to and returns its injected error, if any.
func (d *FaultDevice) begin(op Op) error {
	n := d.counts[op].Add(1)
	d.mu.Lock()
	f, delay, hang, pv := d.faults[op], d.delays[op], d.hangs[op], d.panics[op]
	d.mu.Unlock()
	if delay > 0 {
		time.Sleep(delay)
	}
	if hang != nil {
		d.hanging[op].Add(1)
		<-hang
		d.hanging[op].Add(-1)
	}
	if pv != nil {
		panic(pv)
	}
	if f != nil && n > f.after {
		return fmt.Errorf("%v %s: %w", op, d.Name(), f.err)
	}
	return nil
}

// ReadAt reads from the wrapped device unless a fault is injected.
func (d *FaultDevice) ReadAt(p []byte, off int64) (int, error) {
	if err := d.begin(OpRead); err != nil {
		return 0, err
	}
	return d.Device.ReadAt(p, off)
}

// WriteAt writes to the wrapped device unless a fault is injected.
func (d *FaultDevice) WriteAt(p []byte, off int64) (int, error) {
	if err := d.begin(OpWrite); err != nil {
		return 0, err
	}
	return d.Device.WriteAt(p, off)
}

// Flush flushes the wrapped device unless a fault is injected.
func (d *FaultDevice) Flush() error {
	if err := d.begin(OpFlush); err != nil {
		return err
	}
	return storage.Flush(d.Device)
}

// Discard discards on the wrapped device unless a fault is injected.
func (d *FaultDevice) Discard(off, n int64) error {
	if err := d.begin(OpDiscard); err != nil {
		return err
	}
	return storage.Discard(d.Device, off, n)
}

// WriteZeroes zeroes on the wrapped device unless a fault is injected.
func (d *FaultDevice) WriteZeroes(off, n int64) error {
	if err := d.begin(OpWriteZeroes); err != nil {
		return err
	}
	return storage.WriteZeroes(d.Device, off, n)
}

// Grow grows the wrapped device unless a fault is injected.
func (d *FaultDevice) Grow(size int64) error {
	if err := d.begin(OpGrow); err != nil {
		return err
	}
	g, ok := d.Device.(storage.Grower)
	if !ok {
		return fmt.Errorf("grow %s: %w", d.Name(), errors.ErrUnsupported)
	}
	return g.Grow(size)
}

// NullDevice reads zeros and drops writes: a huge device that takes no
// memory.
type NullDevice struct {
	name string
	geo  storage.Geometry
}

// NewNullDevice returns a NullDevice of the given geometry (block sizes
// default to 512 bytes).
func NewNullDevice(name string, geo storage.Geometry) *NullDevice {
	if geo.LogicalBlockSize == 0 {
		geo.LogicalBlockSize = storage.SectorSize
	}
	if geo.PhysicalBlockSize == 0 {
		geo.PhysicalBlockSize = geo.LogicalBlockSize
	}
	if geo.MinIOSize == 0 {
		geo.MinIOSize = geo.LogicalBlockSize
	}
	return &NullDevice{name: name, geo: geo}
}

// Name returns the device's name.
func (d *NullDevice) Name() string { return d.name }

// Geometry returns the device's geometry.
func (d *NullDevice) Geometry() storage.Geometry { return d.geo }

// ReadAt fills p with zeros.
func (d *NullDevice) ReadAt(p []byte, off int64) (int, error) {
	clear(p)
	return len(p), nil
}

// WriteAt drops p.
func (d *NullDevice) WriteAt(p []byte, off int64) (int, error) { return len(p), nil }

// Close does nothing.
func (d *NullDevice) Close() error { return nil }
