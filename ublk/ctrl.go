package ublk

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/ublksnap/ublksnap/ublk/internal/uring"
	"golang.org/x/sys/unix"
)

// ControlPath is the ublk control device node.
const ControlPath = "/dev/ublk-control"

const (
	anyDevID  = 0xFFFFFFFF // ADD_DEV: let the kernel choose the id
	noQueueID = 0xFFFF     // the command is not per queue
	enotsupp  = 524        // kernel-internal ENOTSUPP that old drivers leak

	// ctrlPoll is how often a waiting control command checks for cancellation.
	ctrlPoll = 100 * time.Millisecond
	// ctrlCancelGrace bounds the wait for a cancelled command's completion.
	ctrlCancelGrace = 5 * time.Second
)

// Ctrl is an open /dev/ublk-control with its own SQE128 io_uring. Control
// commands are serialized on that ring, except START_DEV, which blocks in
// the kernel until the queues are ready and therefore runs on a ring of its
// own (see startDev). A Ctrl serves one device.
type Ctrl struct {
	fd int // /dev/ublk-control; immutable until close

	// mu serializes the use of ring and buf.
	mu   sync.Mutex
	ring *uring.Ring // SQE128 control ring; guarded by mu
	buf  []byte      // one anonymous page for command payloads; guarded by mu

	// encoded selects ioctl-encoded opcodes (UBLK_F_CMD_IOCTL_ENCODE); set
	// once by AddDev before any concurrent use.
	encoded bool
}

// OpenCtrl opens the control device. It returns an error wrapping ErrNoUblk
// when the node does not exist.
func OpenCtrl() (*Ctrl, error) {
	fd, err := unix.Open(ControlPath, unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil, fmt.Errorf("%w: %v", ErrNoUblk, err)
		}
		return nil, fmt.Errorf("ublk: open %s: %w", ControlPath, err)
	}
	c := &Ctrl{fd: fd, encoded: true}
	c.ring, err = uring.New(uring.Params{Entries: 4, Flags: uring.SetupSQE128})
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("ublk: control ring: %w", err)
	}
	c.buf, err = unix.Mmap(-1, 0, pageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		c.ring.Close()
		unix.Close(fd)
		return nil, fmt.Errorf("ublk: control buffer: %w", err)
	}
	return c, nil
}

// Close releases the control ring and device.
func (c *Ctrl) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	var errs []error
	if c.ring != nil {
		errs = append(errs, c.ring.Close())
		c.ring = nil
	}
	if c.buf != nil {
		errs = append(errs, unix.Munmap(c.buf))
		c.buf = nil
	}
	if c.fd >= 0 {
		errs = append(errs, unix.Close(c.fd))
		c.fd = -1
	}
	return errors.Join(errs...)
}

// ctrlError is a failed control command.
type ctrlError struct {
	Cmd   string
	DevID uint32
	Err   error
}

func (e *ctrlError) Error() string {
	if e.DevID == anyDevID {
		return fmt.Sprintf("ublk: %s: %v", e.Cmd, e.Err)
	}
	return fmt.Sprintf("ublk: %s (dev %d): %v", e.Cmd, e.DevID, e.Err)
}

func (e *ctrlError) Unwrap() error { return e.Err }

var cmdNames = map[uint32]string{
	cmdGetQueueAff: "GET_QUEUE_AFFINITY", cmdGetDevInfo: "GET_DEV_INFO", cmdAddDev: "ADD_DEV", cmdDelDev: "DEL_DEV",
	cmdStartDev: "START_DEV", cmdStopDev: "STOP_DEV", cmdSetParams: "SET_PARAMS",
	cmdGetParams: "GET_PARAMS", cmdGetFeatures: "GET_FEATURES", cmdDelDevAsync: "DEL_DEV_ASYNC",
	cmdStartUserRecovery: "START_USER_RECOVERY", cmdEndUserRecovery: "END_USER_RECOVERY",
}

// issue sends one control command on ring and waits for its completion, or
// until cancel is closed (the command is then cancelled in the kernel).
// payloadLen bytes of c.buf are passed as addr/len when payloadLen > 0. The
// caller holds whatever protects ring and c.buf.
func (c *Ctrl) issue(ring *uring.Ring, nr uint32, encoded bool, cmd ctrlCmd, payload []byte, cancel <-chan struct{}) (int32, error) {
	name := cmdNames[nr]
	if payload != nil {
		cmd.Addr = uint64(uintptr(unsafe.Pointer(&payload[0])))
		cmd.Len = uint16(len(payload))
	}
	sqe, err := ring.GetSQE()
	if err != nil {
		return 0, &ctrlError{name, cmd.DevID, err}
	}
	const userData = 1
	uring.PrepURingCmd(sqe, c.fd, ctrlOpcode(nr, encoded), userData)
	*(*ctrlCmd)(unsafe.Pointer(&sqe.Cmd80()[0])) = cmd
	var deadline time.Time
	for {
		if cqe, ok := ring.PeekCQE(); ok {
			ring.SeenCQE()
			if cqe.UserData != userData {
				continue // completion of an ASYNC_CANCEL
			}
			if cqe.Res < 0 {
				return cqe.Res, &ctrlError{name, cmd.DevID, syscall.Errno(-cqe.Res)}
			}
			return cqe.Res, nil
		}
		if deadline.IsZero() {
			select {
			case <-cancel:
				if sqe, err := ring.GetSQE(); err == nil {
					uring.PrepCancel(sqe, userData, 2)
				}
				deadline = time.Now().Add(ctrlCancelGrace)
			default:
			}
		} else if time.Now().After(deadline) {
			return 0, &ctrlError{name, cmd.DevID, errors.New("cancelled command did not complete")}
		}
		if err := ring.WaitTimeout(ctrlPoll); err != nil && !errors.Is(err, uring.ErrTimeout) {
			return 0, &ctrlError{name, cmd.DevID, err}
		}
	}
}

// simple runs a command without payload or cancellation on the shared ring.
func (c *Ctrl) simple(nr, devID uint32, data uint64) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, err := c.issue(c.ring, nr, c.encoded, ctrlCmd{DevID: devID, QueueID: noQueueID, Data: data}, nil, nil)
	return err
}

// Features returns the kernel's UBLK_F_* mask (GET_FEATURES, Linux 6.5+).
func (c *Ctrl) Features() (uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.buf[:8]
	clear(p)
	if _, err := c.issue(c.ring, cmdGetFeatures, true, ctrlCmd{DevID: anyDevID, QueueID: noQueueID}, p, nil); err != nil {
		return 0, err
	}
	return *(*uint64)(unsafe.Pointer(&p[0])), nil
}

// AddDev creates a device from info (DevID anyDevID for a new id) and
// returns what the kernel made of it: the real id, clamped queue count,
// rounded buffer size and negotiated flags. It tries the ioctl-encoded
// opcode first and falls back to the legacy one on kernels before 6.4.
func (c *Ctrl) AddDev(info devInfo) (devInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.buf[:unsafe.Sizeof(devInfo{})]
	try := func(encoded bool) error {
		*(*devInfo)(unsafe.Pointer(&p[0])) = info
		_, err := c.issue(c.ring, cmdAddDev, encoded, ctrlCmd{DevID: info.DevID, QueueID: noQueueID}, p, nil)
		return err
	}
	err := try(true)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, syscall.Errno(enotsupp)) {
		err = try(false)
	}
	if err != nil {
		return devInfo{}, err
	}
	out := *(*devInfo)(unsafe.Pointer(&p[0]))
	c.encoded = out.Flags&featCmdIoctlEncode != 0
	return out, nil
}

// DevInfo returns GET_DEV_INFO for devID.
func (c *Ctrl) DevInfo(devID uint32) (devInfo, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.buf[:unsafe.Sizeof(devInfo{})]
	clear(p)
	if _, err := c.issue(c.ring, cmdGetDevInfo, c.encoded, ctrlCmd{DevID: devID, QueueID: noQueueID}, p, nil); err != nil {
		return devInfo{}, err
	}
	return *(*devInfo)(unsafe.Pointer(&p[0])), nil
}

// SetParams sends the full 152-byte ublk_params.
func (c *Ctrl) SetParams(devID uint32, prm params) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.buf[:unsafe.Sizeof(params{})]
	*(*params)(unsafe.Pointer(&p[0])) = prm
	_, err := c.issue(c.ring, cmdSetParams, c.encoded, ctrlCmd{DevID: devID, QueueID: noQueueID}, p, nil)
	return err
}

// Params returns GET_PARAMS for devID.
func (c *Ctrl) Params(devID uint32) (params, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.buf[:unsafe.Sizeof(params{})]
	clear(p)
	*(*uint32)(unsafe.Pointer(&p[0])) = len152
	if _, err := c.issue(c.ring, cmdGetParams, c.encoded, ctrlCmd{DevID: devID, QueueID: noQueueID}, p, nil); err != nil {
		return params{}, err
	}
	return *(*params)(unsafe.Pointer(&p[0])), nil
}

// QueueAffinity returns the CPUs blk-mq maps to queue qid of devID.
func (c *Ctrl) QueueAffinity(devID uint32, qid int) (unix.CPUSet, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	var set unix.CPUSet
	p := c.buf[:unsafe.Sizeof(set)]
	clear(p)
	if _, err := c.issue(c.ring, cmdGetQueueAff, c.encoded, ctrlCmd{DevID: devID, QueueID: noQueueID, Data: uint64(qid)}, p, nil); err != nil {
		return set, err
	}
	set = *(*unix.CPUSet)(unsafe.Pointer(&p[0]))
	return set, nil
}

// StartDev sends START_DEV on a ring of its own, because the kernel holds it
// until every tag of every queue has a FETCH pending and serves the
// partition scan before it completes. Closing cancel aborts the wait.
func (c *Ctrl) StartDev(devID uint32, cancel <-chan struct{}) error {
	return c.waitingCmd(cmdStartDev, devID, cancel)
}

// EndUserRecovery sends END_USER_RECOVERY, which takes START_DEV's place
// for a recovered device and, like it, waits for every FETCH.
func (c *Ctrl) EndUserRecovery(devID uint32, cancel <-chan struct{}) error {
	return c.waitingCmd(cmdEndUserRecovery, devID, cancel)
}

// waitingCmd runs a command that blocks until the queues are ready on a
// ring of its own, with this process's pid (the tgid, which 6.16+ checks
// against the opener of the character device) as its data.
func (c *Ctrl) waitingCmd(nr, devID uint32, cancel <-chan struct{}) error {
	ring, err := uring.New(uring.Params{Entries: 2, Flags: uring.SetupSQE128})
	if err != nil {
		return &ctrlError{cmdNames[nr], devID, err}
	}
	defer ring.Close()
	_, err = c.issue(ring, nr, c.encoded, ctrlCmd{DevID: devID, QueueID: noQueueID, Data: uint64(os.Getpid())}, nil, cancel)
	return err
}

// StartUserRecovery sends START_USER_RECOVERY to a quiesced device; the
// kernel answers EBUSY while the old server's character device is still
// open or the device is not quiesced yet.
func (c *Ctrl) StartUserRecovery(devID uint32) error {
	return c.simple(cmdStartUserRecovery, devID, 0)
}

// StopDev sends STOP_DEV: the block device goes away and pending FETCHes
// complete with -ENODEV.
func (c *Ctrl) StopDev(devID uint32) error { return c.simple(cmdStopDev, devID, 0) }

// DelDev deletes the device, with DEL_DEV_ASYNC (Linux 6.9+) when the
// kernel has it so that a lingering reference cannot hang the caller, else
// with the synchronous DEL_DEV.
func (c *Ctrl) DelDev(devID uint32) error {
	err := c.simple(cmdDelDevAsync, devID, 0)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, syscall.Errno(enotsupp)) {
		err = c.simple(cmdDelDev, devID, 0)
	}
	return err
}
