package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/ublk"
)

func attachCmd(g *globalFlags) *cobra.Command {
	var req api.AttachRequest
	cmd := &cobra.Command{
		Use:   "attach --backing PATH [--name NAME] [--queues N] [--depth N] [--io-mode MODE]",
		Short: "Present a backing file or disk as a filtered device /dev/ublkbN",
		Args:  noArgs,
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
			dev, err := g.client().Attach(cmd.Context(), req)
			if err != nil {
				return fmt.Errorf("attach %s: %w", req.Backing, err)
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
	return cmd
}
