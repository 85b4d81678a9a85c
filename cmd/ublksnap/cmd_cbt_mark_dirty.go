package main

import (
	"context"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/storage"
)

func cbtMarkDirtyCmd(g *globalFlags) *cobra.Command {
	var device, file string
	var ranges []string
	cmd := &cobra.Command{
		Use:   "mark-dirty --device DEV (--ranges START:COUNT... | --file PATH)",
		Short: "Mark sectors of a device changed, in the current backup and the next",
		Long: `Mark sectors of a device changed in both maps: the backup of the snapshot
held now copies them, and so does the next one. --ranges takes START:COUNT in
512-byte sectors (repeat the flag or separate with commas); --file marks where
a file on a filesystem mounted from DEV lives (FIEMAP).`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "device"); err != nil {
				return err
			}
			if (len(ranges) == 0) == (file == "") {
				return usagef("give either --ranges or --file")
			}
			var sectors []storage.Range
			var err error
			if file != "" {
				sectors, err = fileSectors(cmd.Context(), g, device, file)
			} else {
				sectors, err = parseRanges(ranges)
			}
			if err != nil {
				return err
			}
			req := api.MarkDirtyRequest{Device: device}
			for _, r := range sectors {
				if r.Start > 1<<53 || r.Count > 1<<53 {
					return usagef("range %d:%d is beyond any device", r.Start, r.Count)
				}
				req.Ranges = append(req.Ranges, cbt.Extent{Offset: r.Start << storage.SectorShift, Length: r.Count << storage.SectorShift})
			}
			if err := g.client().MarkDirty(cmd.Context(), req); err != nil {
				return fmt.Errorf("cbt mark-dirty of %s: %w", device, err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&device, "device", "", "filtered device, e.g. /dev/ublkb0 (required)")
	cmd.Flags().StringArrayVar(&ranges, "ranges", nil, "START:COUNT in 512-byte sectors; repeatable")
	cmd.Flags().StringVar(&file, "file", "", "a file on a filesystem mounted from DEV: mark its extents")
	return cmd
}

// fileSectors returns the sectors of DEV that hold the data of file, which
// must live on a filesystem mounted from the device.
func fileSectors(ctx context.Context, g *globalFlags, device, file string) ([]storage.Range, error) {
	d, err := findDevice(ctx, g.client(), device)
	if err != nil {
		return nil, err
	}
	node := d.Path
	var dev, fst unix.Stat_t
	if err := unix.Stat(node, &dev); err != nil {
		return nil, fmt.Errorf("stat %s: %w", node, err)
	}
	f, err := os.Open(file)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := unix.Fstat(int(f.Fd()), &fst); err != nil {
		return nil, fmt.Errorf("stat %s: %w", file, err)
	}
	if fst.Dev != dev.Rdev {
		return nil, fmt.Errorf("%s is not on a filesystem mounted from %s", file, node)
	}
	return storage.FileExtents(f)
}
