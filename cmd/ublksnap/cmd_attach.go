package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/internal/devconf"
	"github.com/ublksnap/ublksnap/ublk"
)

func attachCmd(g *globalFlags) *cobra.Command {
	var req api.AttachRequest
	var persist bool
	cmd := &cobra.Command{
		Use:   "attach --backing PATH [--name NAME] [--queues N] [--depth N] [--io-mode MODE] [--persist]",
		Short: "Present a backing file or disk as a filtered device /dev/ublkbN",
		Long: "With --persist the device is also declared in the devices file (--devices-file),\n" +
			"so that the daemon attaches it again at every start, before file systems are\n" +
			"mounted at boot. Declare a disk by a stable path (/dev/disk/by-id/...,\n" +
			"/dev/disk/by-partuuid/...): /dev/sdX may name another disk at the next boot.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "backing"); err != nil {
				return err
			}
			var err error
			if req.Backing, err = absPath("backing", req.Backing); err != nil {
				return err
			}
			if req.Queues < 0 || req.Depth < 0 {
				return usagef("--queues and --depth must be positive")
			}
			if req.IOMode != "" {
				if _, err := ublk.ParseIOMode(req.IOMode); err != nil {
					return usagef("--io-mode %q: want %s", req.IOMode, ioModes)
				}
			}
			decl := devconf.Device{Name: req.Name, Backing: req.Backing, Queues: req.Queues, Depth: req.Depth, IOMode: req.IOMode}
			if persist {
				if decl.Name == "" {
					return usagef("--persist needs --name: the declaration names the device")
				}
				if err := decl.Check(); err != nil {
					return usagef("--persist: %v", err)
				}
			}
			dev, err := g.client().Attach(cmd.Context(), req)
			if err != nil {
				return fmt.Errorf("attach %s: %w", req.Backing, err)
			}
			if persist {
				if err := devconf.Add(g.devicesFile, decl); err != nil {
					return fmt.Errorf("%s is attached as %s, but not declared: %w", req.Backing, dev.Path, err)
				}
			}
			return g.output(cmd, dev, func(w io.Writer) error {
				_, err := fmt.Fprintln(w, dev.Path)
				return err
			})
		},
	}
	cmd.Flags().StringVar(&req.Backing, "backing", "", "backing file or block device (required)")
	cmd.Flags().StringVar(&req.Name, "name", "", "a name for the device (default: the backing file's name)")
	cmd.Flags().IntVar(&req.Queues, "queues", 0, "ublk queues (default min(CPUs, 4))")
	cmd.Flags().IntVar(&req.Depth, "depth", 0, "ublk queue depth (default 128)")
	cmd.Flags().StringVar(&req.IOMode, "io-mode", "", "how data moves: "+ioModes+" (default: the daemon's --io-mode)")
	cmd.Flags().BoolVar(&persist, "persist", false, "also declare it in the devices file, to be attached at every daemon start (needs --name)")
	return cmd
}
