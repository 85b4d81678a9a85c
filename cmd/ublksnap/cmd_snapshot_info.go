package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

func snapshotInfoCmd(g *globalFlags) *cobra.Command {
	var device string
	cmd := &cobra.Command{
		Use:   "info --device DEV",
		Short: "Show the snapshot state, image and error code of a filtered device",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "device"); err != nil {
				return err
			}
			i, err := g.client().SnapshotInfo(cmd.Context(), device)
			if err != nil {
				return fmt.Errorf("snapshot info of %s: %w", device, err)
			}
			return g.output(cmd, i, func(w io.Writer) error {
				_, err := fmt.Fprintf(w, "snapshot=%s\nstate=%s\nimage=%s\nerror_code=%d\n", i.Snapshot, i.State, i.Image, i.ErrorCode)
				return err
			})
		},
	}
	cmd.Flags().StringVar(&device, "device", "", "filtered device, e.g. /dev/ublkb0 (required)")
	return cmd
}
