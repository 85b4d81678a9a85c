package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func detachCmd(g *globalFlags) *cobra.Command {
	var device string
	var force bool
	cmd := &cobra.Command{
		Use:   "detach --device DEV [--force]",
		Short: "Stop a filtered device (it must not be in a snapshot)",
		Long: "Stops the device and flushes its backing. It is refused while the device\n" +
			"is mounted or open (the error names who holds it) unless --force, which\n" +
			"tears the disk out from under its users.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "device"); err != nil {
				return err
			}
			if err := g.client().Detach(cmd.Context(), device, force); err != nil {
				return fmt.Errorf("detach %s: %w", device, err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&device, "device", "", "filtered device, e.g. /dev/ublkb0 (required)")
	cmd.Flags().BoolVar(&force, "force", false, "detach even while the device is mounted or open")
	return cmd
}
