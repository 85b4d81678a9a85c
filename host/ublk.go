package host

import (
	"context"
	"fmt"

	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/snapshot"
	"github.com/ublksnap/ublksnap/ublk"
)

// UblkServer serves block devices with package ublk.
type UblkServer struct{}

// Serve creates a ublk device.
func (UblkServer) Serve(ctx context.Context, cfg ublk.Config, h ublk.Handler) (snapshot.BlockDevice, error) {
	return withDevNum(ublk.New(ctx, cfg, h))
}

// Recover serves a ublk device again.
func (UblkServer) Recover(ctx context.Context, id int, cfg ublk.Config, h ublk.Handler) (snapshot.BlockDevice, error) {
	return withDevNum(ublk.Recover(ctx, id, cfg, h))
}

// Scan lists the ublk devices.
func (UblkServer) Scan() ([]ublk.Info, error) { return ublk.Scan() }

// Remove deletes a ublk device.
func (UblkServer) Remove(id int) error { return ublk.Remove(id) }

// withDevNum adds the device number of a served device's node.
func withDevNum(d *ublk.Device, err error) (snapshot.BlockDevice, error) {
	if err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Stat(d.Path(), &st); err != nil {
		d.Close()
		return nil, fmt.Errorf("stat %s: %w", d.Path(), err)
	}
	return &ublkDevice{Device: d, dev: st.Rdev}, nil
}

// ublkDevice is a ublk.Device with its device number.
type ublkDevice struct {
	*ublk.Device
	dev uint64 // st_rdev of the node; immutable
}

func (d *ublkDevice) DevNum() uint64 { return d.dev }
