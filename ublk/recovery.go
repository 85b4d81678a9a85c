package ublk

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	// quiesceTimeout bounds the wait for a device whose server just died
	// to leave the live state: on 6.12 the kernel quiesces it only once
	// the old process's rings are torn down.
	quiesceTimeout = 30 * time.Second
	// recoveryPoll is how often Recover polls the device state and retries
	// START_USER_RECOVERY while it answers EBUSY.
	recoveryPoll = 50 * time.Millisecond
)

// charDevDir lists the ublk character devices, one entry ublkcN per device.
const charDevDir = "/sys/class/ublk-char"

// Scan returns the kernel's view of every ublk device, by id.
func Scan() ([]Info, error) {
	ents, err := os.ReadDir(charDevDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("ublk: scan devices: %w", err)
	}
	ctrl, err := OpenCtrl()
	if err != nil {
		return nil, err
	}
	defer ctrl.Close()
	var out []Info
	for _, e := range ents {
		n, err := strconv.ParseUint(strings.TrimPrefix(e.Name(), "ublkc"), 10, 32)
		if err != nil || !strings.HasPrefix(e.Name(), "ublkc") {
			continue
		}
		info, err := ctrl.info(uint32(n))
		if errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT) {
			continue // deleted since the listing
		}
		if err != nil {
			return nil, fmt.Errorf("ublk: scan devices: %w", err)
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Remove stops and deletes device id, whoever serves it. Requests held by
// a device that waits for recovery fail with EIO.
func Remove(id int) error {
	ctrl, err := OpenCtrl()
	if err != nil {
		return err
	}
	defer ctrl.Close()
	return errors.Join(ctrl.StopDev(uint32(id)), ctrl.DelDev(uint32(id)))
}

// Recover serves device id again after its server died: the device must
// have been created with cfg.Recoverable and cfg.Owner, and is waiting in
// the quiesced state (a device whose server is still exiting is waited for,
// up to 30 s). The sequence is the kernel's: START_USER_RECOVERY (retried
// while the old server's character device is still open), open
// /dev/ublkcN, start the queues and send END_USER_RECOVERY, which releases
// the held requests to h. The same /dev/ublkbN stays; its users see a
// pause. cfg's size must match the device's; its queues, depth and buffer
// size are the kernel's. A device that is not ours, not recoverable or
// still live after the wait is left as it is (ErrNotRecoverable); once
// START_USER_RECOVERY was sent, a failed recovery stops and deletes the
// device: it is tried once, never left half-alive.
func Recover(ctx context.Context, id int, cfg Config, h Handler) (*Device, error) {
	if id < 0 || id >= anyDevID {
		return nil, fmt.Errorf("%w: device id %d", ErrInvalidConfig, id)
	}
	return serve(ctx, cfg, h, uint32(id), (*Device).recover)
}

// recover is Recover's setup: on error the caller tears the device down.
func (d *Device) recover(ctx context.Context) error {
	d.log = d.log.With("ublk", d.id)
	d.untouched = true // until START_USER_RECOVERY: not ours to delete
	di, err := d.awaitQuiesced(ctx)
	if err != nil {
		return err
	}
	p, err := d.ctrl.Params(d.id)
	if err != nil {
		return err
	}
	if size := int64(p.Basic.DevSectors) << sectorShift; size != d.cfg.Size {
		return fmt.Errorf("%w: device %d has %d bytes, expected %d", ErrNotRecoverable, d.id, size, d.cfg.Size)
	}
	d.info = di
	d.untouched = false
	deadline := time.Now().Add(quiesceTimeout)
	for {
		err = d.ctrl.StartUserRecovery(d.id)
		if !errors.Is(err, unix.EBUSY) || time.Now().After(deadline) {
			break
		}
		if err := sleepCtx(ctx, recoveryPoll); err != nil {
			return err
		}
	}
	if err != nil {
		return err
	}
	if err := d.openCdev(ctx); err != nil {
		return err
	}
	return d.startQueues(ctx, d.ctrl.EndUserRecovery)
}

// awaitQuiesced checks that the device is ours and recoverable and waits
// while it is still live (its old server exiting).
func (d *Device) awaitQuiesced(ctx context.Context) (devInfo, error) {
	deadline := time.Now().Add(quiesceTimeout)
	for {
		di, err := d.ctrl.DevInfo(d.id)
		if err != nil {
			return devInfo{}, err
		}
		switch {
		case di.UblksrvFlags != d.cfg.Owner:
			return devInfo{}, fmt.Errorf("%w: device %d has owner %#x, not %#x", ErrNotRecoverable, d.id, di.UblksrvFlags, d.cfg.Owner)
		case di.Flags&featUserRecovery == 0:
			return devInfo{}, fmt.Errorf("%w: device %d was not created recoverable", ErrNotRecoverable, d.id)
		case di.State == devStateQuiesced || di.State == devStateFailIO:
			return di, nil
		case di.State != devStateLive || time.Now().After(deadline):
			return devInfo{}, fmt.Errorf("%w: device %d is %s, not waiting for a server", ErrNotRecoverable, d.id, State(di.State))
		}
		if err := sleepCtx(ctx, recoveryPoll); err != nil {
			return devInfo{}, err
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(d):
		return nil
	}
}
