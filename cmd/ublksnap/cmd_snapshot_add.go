package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func snapshotAddCmd(g *globalFlags) *cobra.Command {
	var device string
	cmd := idCmd("add --id UUID --device DEV", "Add a filtered device to a snapshot not yet taken",
		func(cmd *cobra.Command, id string) error {
			if err := required(cmd, "device"); err != nil {
				return err
			}
			s, err := g.client().AddDevice(cmd.Context(), id, device)
			if err != nil {
				return fmt.Errorf("add %s to snapshot %s: %w", device, id, err)
			}
			return g.printSnapshot(cmd, s)
		})
	cmd.Flags().StringVar(&device, "device", "", "filtered device, e.g. /dev/ublkb0 (required)")
	return cmd
}
