package ublk

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// cdevOpenTimeout bounds the retries of opening /dev/ublkcN, which
	// udev may hold briefly after ADD_DEV.
	cdevOpenTimeout = 5 * time.Second
	// drainTimeout bounds the wait for the queues to see their aborts after
	// STOP_DEV before they are told to quit anyway.
	drainTimeout = 10 * time.Second
)

// Device is a started ublk block device served by a Handler. Create it
// with New; it runs until Close is called or the context given to New is
// cancelled, and then deletes itself from the kernel.
type Device struct {
	cfg  Config       // validated configuration; immutable
	h    Handler      // serves the requests; immutable
	log  *slog.Logger // immutable
	ctrl *Ctrl        // control device; closed by Close
	id   uint32       // kernel device id; immutable after ADD_DEV
	info devInfo      // what ADD_DEV negotiated; immutable
	cdev int          // /dev/ublkcN fd, -1 until opened; closed by Close

	// untouched is set while Recover has not yet claimed the device:
	// teardown then leaves it in the kernel. Written by setup only.
	untouched bool

	queues  []*queue      // running queue goroutines; set once before they start
	started bool          // START_DEV succeeded; written before New returns
	closing chan struct{} // closed when teardown begins
	// failed is closed (once, via failOnce) when a queue goroutine ends
	// while the device is not closing: the device is then torn down.
	failed   chan struct{}
	failOnce sync.Once

	closeOnce sync.Once
	closeErr  error         // result of teardown; read after done is closed
	done      chan struct{} // closed when the device is gone from the kernel
}

// New creates, configures and starts a ublk device for cfg served by h,
// and returns once /dev/ublkbN exists. Cancelling ctx later stops and
// deletes the device (as Close does). Config problems are reported before
// any kernel call.
func New(ctx context.Context, cfg Config, h Handler) (*Device, error) {
	return serve(ctx, cfg, h, anyDevID, (*Device).setup)
}

// serve validates cfg, opens the control device, runs setup (ADD_DEV and
// START_DEV, or the recovery sequence) for device id, and watches the
// result: a cancelled ctx or a queue that stops on its own tears it down.
func serve(ctx context.Context, cfg Config, h Handler, id uint32, setup func(*Device, context.Context) error) (*Device, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if h == nil {
		return nil, fmt.Errorf("%w: nil handler", ErrInvalidConfig)
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	ctrl, err := OpenCtrl()
	if err != nil {
		return nil, err
	}
	d := &Device{cfg: cfg, h: h, log: log, ctrl: ctrl, cdev: -1, id: id,
		closing: make(chan struct{}), failed: make(chan struct{}), done: make(chan struct{})}
	if err := setup(d, ctx); err != nil {
		d.closeOnce.Do(d.teardown)
		return nil, err
	}
	go func() {
		select {
		case <-ctx.Done():
			d.Close()
		case <-d.failed:
			d.log.Error("ublk: a queue stopped on its own; deleting the device")
			d.Close()
		case <-d.done:
		}
	}()
	return d, nil
}

// setup runs ADD_DEV, SET_PARAMS, the queues and START_DEV. On error the
// caller runs teardown.
func (d *Device) setup(ctx context.Context) error {
	feats, err := d.ctrl.Features()
	switch {
	case errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, syscall.Errno(enotsupp)):
		feats = ^uint64(0) // pre-6.5: ask, ADD_DEV masks
	case err != nil:
		return err
	}
	want := uint64(featURingCmdCompInTask | featCmdIoctlEncode)
	const rec = featUserRecovery | featUserRecoveryReissue
	if d.cfg.Recoverable {
		want |= rec
	}
	if d.cfg.NoPartitionScan {
		want |= featNoAutoPartScan
	}
	mode, flag, err := d.cfg.IOMode.pick(feats, d.cfg.WriteData || d.cfg.InlineMax > 0)
	if err != nil {
		return err
	}
	want |= flag
	info, err := d.ctrl.AddDev(devInfo{
		NrHwQueues:    uint16(d.cfg.Queues),
		QueueDepth:    uint16(d.cfg.Depth),
		MaxIOBufBytes: uint32(d.cfg.MaxIOSize),
		DevID:         anyDevID,
		Flags:         want & feats,
		UblksrvFlags:  d.cfg.Owner,
	})
	if err != nil {
		return err
	}
	d.id, d.info = info.DevID, info
	d.log = d.log.With("ublk", d.id)
	if got := modeOf(info.Flags); got != mode && d.cfg.IOMode != IOModeAuto {
		return fmt.Errorf("%w: asked for %v, ADD_DEV granted flags %#x (%v)", ErrNotSupported, mode, info.Flags, got)
	}
	if d.cfg.Recoverable && info.Flags&rec != rec {
		return fmt.Errorf("%w: this kernel's ublk has no USER_RECOVERY with REISSUE", ErrNotSupported)
	}
	if info.NrHwQueues == 0 || int(info.QueueDepth) != d.cfg.Depth || info.MaxIOBufBytes < pageSize {
		return fmt.Errorf("ublk: ADD_DEV returned %d queues of depth %d with %d-byte buffers for a request of %d × %d × %d",
			info.NrHwQueues, info.QueueDepth, info.MaxIOBufBytes, d.cfg.Queues, d.cfg.Depth, d.cfg.MaxIOSize)
	}
	prm := d.cfg.kernelParams()
	prm.Basic.MaxSectors = min(prm.Basic.MaxSectors, info.MaxIOBufBytes>>sectorShift)
	if err := d.ctrl.SetParams(d.id, prm); err != nil {
		return err
	}
	if err := d.openCdev(ctx); err != nil {
		return err
	}

	return d.startQueues(ctx, d.ctrl.StartDev)
}

// startQueues creates a queue per hardware queue the kernel granted,
// starts their goroutines, waits for their FETCHes and then sends start
// (START_DEV or END_USER_RECOVERY) from this goroutine while the queues
// already serve the partition scan.
func (d *Device) startQueues(ctx context.Context, start func(devID uint32, cancel <-chan struct{}) error) error {
	info := d.info
	encoded := info.Flags&featCmdIoctlEncode != 0
	var qs []*queue
	for i := 0; i < int(info.NrHwQueues); i++ {
		q := newQueue(i, int(info.QueueDepth), int(info.MaxIOBufBytes), d.cdev, encoded, d.h, d.log)
		// The mode is the one the device was created in (also when it is
		// recovered), whatever this process's Config asks.
		q.mode = modeOf(info.Flags)
		q.userCopy = info.Flags&featUserCopy != 0
		q.writeData, q.inlineMax = d.cfg.WriteData, d.cfg.InlineMax
		q.bufMemory = cmp.Or(d.cfg.BufferMemory, DefaultBufferMemory)
		for _, fd := range d.cfg.Files {
			q.files = append(q.files, int32(fd))
		}
		// Without UBLK_F_NO_AUTO_PART_SCAN, an untrusted server is the
		// kernel's only reason to skip the scan.
		q.untrusted = d.cfg.NoPartitionScan && info.Flags&featNoAutoPartScan == 0
		if d.cfg.PinQueues {
			set, err := d.ctrl.QueueAffinity(d.id, i)
			if err != nil {
				return err
			}
			if set.Count() > 0 {
				q.cpus = &set
			}
		}
		qs = append(qs, q)
	}
	ready := make(chan error, len(qs))
	d.queues = qs
	for _, q := range qs {
		go q.run(ready)
		go func() {
			<-q.exited
			select {
			case <-d.closing:
			default:
				d.failOnce.Do(func() { close(d.failed) })
			}
		}()
	}
	var errs []error
	for range d.queues {
		if err := <-ready; err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	cancel := make(chan struct{})
	startErr := make(chan error, 1)
	go func() { startErr <- start(d.id, cancel) }()
	var err error
	select {
	case err = <-startErr:
	case <-ctx.Done():
		close(cancel)
		<-startErr
		err = ctx.Err()
	case <-d.failed:
		close(cancel)
		<-startErr
		err = errors.New("ublk: a queue stopped while the device was starting")
	}
	if err != nil {
		return err
	}
	d.started = true
	return nil
}

// openCdev opens /dev/ublkcN, retrying while it is not there yet or held
// by udev.
func (d *Device) openCdev(ctx context.Context) error {
	path := fmt.Sprintf("/dev/ublkc%d", d.id)
	deadline := time.Now().Add(cdevOpenTimeout)
	for {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err == nil {
			d.cdev = fd
			return nil
		}
		if (err != unix.ENOENT && err != unix.EBUSY) || time.Now().After(deadline) {
			return fmt.Errorf("ublk: open %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// ID returns the kernel device id N of /dev/ublkbN.
func (d *Device) ID() int { return int(d.id) }

// Path returns the block device node, /dev/ublkbN.
func (d *Device) Path() string { return fmt.Sprintf("/dev/ublkb%d", d.id) }

// CharPath returns the ublk character device node, /dev/ublkcN.
func (d *Device) CharPath() string { return fmt.Sprintf("/dev/ublkc%d", d.id) }

// IOMode returns the mode the device's data moves in: IOModeZeroCopy,
// IOModeUserCopy or IOModeCopy (the one it was created with, also after a
// recovery).
func (d *Device) IOMode() IOMode { return modeOf(d.info.Flags) }

// Queues returns the number of queues the kernel granted.
func (d *Device) Queues() int { return len(d.queues) }

// Info is the kernel's view of a device (GET_DEV_INFO and GET_PARAMS).
type Info struct {
	ID        int    // N of /dev/ublkbN
	State     State  // StateLive while served
	Queues    int    // hardware queues
	Depth     int    // tags per queue
	MaxIOSize int    // bytes per request buffer
	Flags     uint64 // negotiated UBLK_F_* flags
	Owner     uint64 // Config.Owner of the process that created it
	ServerPID int    // process serving it, -1 when stopped
	Size      int64  // bytes
	DiskMajor uint32 // block device number, 0 before START_DEV
	DiskMinor uint32
}

// Info asks the kernel about the device.
func (d *Device) Info() (Info, error) {
	select {
	case <-d.closing:
		return Info{}, ErrClosed
	default:
	}
	return d.ctrl.info(d.id)
}

// info asks the kernel about device id (GET_DEV_INFO and GET_PARAMS).
func (c *Ctrl) info(id uint32) (Info, error) {
	di, err := c.DevInfo(id)
	if err != nil {
		return Info{}, err
	}
	p, err := c.Params(id)
	if err != nil {
		return Info{}, err
	}
	info := Info{ID: int(di.DevID), State: State(di.State), Queues: int(di.NrHwQueues), Depth: int(di.QueueDepth),
		MaxIOSize: int(di.MaxIOBufBytes), Flags: di.Flags, Owner: di.UblksrvFlags, ServerPID: int(di.UblksrvPID),
		Size: int64(p.Basic.DevSectors) << sectorShift}
	if p.Types&paramTypeDevt != 0 {
		info.DiskMajor, info.DiskMinor = p.Devt.DiskMajor, p.Devt.DiskMinor
	}
	return info, nil
}

// State is a device's state in the kernel (ublksrv_ctrl_dev_info.state).
type State uint16

// Device states.
const (
	StateDead     State = devStateDead     // added, or stopped: no block device
	StateLive     State = devStateLive     // started and served
	StateQuiesced State = devStateQuiesced // USER_RECOVERY: no server, requests wait
	StateFailIO   State = devStateFailIO   // no server, requests fail (6.13+)
)

func (s State) String() string {
	switch s {
	case StateDead:
		return "dead"
	case StateLive:
		return "live"
	case StateQuiesced:
		return "quiesced"
	case StateFailIO:
		return "fail-io"
	}
	return fmt.Sprintf("state(%d)", uint16(s))
}

// Done is closed once the device has been stopped and deleted.
func (d *Device) Done() <-chan struct{} { return d.done }

// Err returns the teardown result once Done is closed, else nil.
func (d *Device) Err() error {
	select {
	case <-d.done:
		return d.closeErr
	default:
		return nil
	}
}

// Close stops the device and deletes it: STOP_DEV (the block device goes
// away, in-flight requests are still served), the queues drain their
// aborted commands and release their rings and mappings, the character
// device is closed and the device deleted. Concurrent and repeated calls
// wait for the same teardown and return its result.
//
// Openers of /dev/ublkbN get I/O errors after Close; Close itself does not
// wait for them to close the node.
func (d *Device) Close() error {
	d.closeOnce.Do(d.teardown)
	<-d.done
	return d.closeErr
}

// teardown runs the validated stop order once.
func (d *Device) teardown() {
	defer close(d.done)
	close(d.closing)
	var errs []error
	owned := d.id != anyDevID && !d.untouched
	if owned {
		// Also for a device whose START_DEV failed or was cancelled: it
		// may have gone live in the kernel all the same.
		if err := d.ctrl.StopDev(d.id); err != nil && d.started {
			errs = append(errs, err)
		}
	}
	d.stopQueues()
	for _, q := range d.queues {
		if q.exitErr != nil {
			errs = append(errs, q.exitErr)
		}
	}
	if d.cdev >= 0 {
		if err := unix.Close(d.cdev); err != nil {
			errs = append(errs, fmt.Errorf("ublk: close %s: %w", d.CharPath(), err))
		}
		d.cdev = -1
	}
	if owned {
		if err := d.ctrl.DelDev(d.id); err != nil {
			errs = append(errs, err)
		}
	}
	if err := d.ctrl.Close(); err != nil {
		errs = append(errs, err)
	}
	d.closeErr = errors.Join(errs...)
	if d.closeErr != nil {
		d.log.Error("ublk: device teardown", "err", d.closeErr)
	}
}

// stopQueues waits for the queue goroutines to exit. After STOP_DEV they do
// so on their own; a device that never started (or a kernel that does not
// abort) gets an explicit quit after drainTimeout.
func (d *Device) stopQueues() {
	wait := drainTimeout
	if !d.started {
		wait = 0
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for _, q := range d.queues {
		select {
		case <-q.exited:
			continue
		case <-timer.C:
			d.log.Warn("ublk: queues did not drain after STOP_DEV, forcing them to quit", "after", wait)
		}
		for _, q := range d.queues {
			q.stop()
		}
		break
	}
	for _, q := range d.queues {
		<-q.exited
		q.closeEventfd()
	}
}

// Recoverable reports whether the device outlives its server's death
// (UBLK_F_USER_RECOVERY).
func (i Info) Recoverable() bool { return i.Flags&featUserRecovery != 0 }
