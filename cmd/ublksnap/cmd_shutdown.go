package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func shutdownCmd(g *globalFlags) *cobra.Command {
	var force bool
	cmd := &cobra.Command{
		Use:   "shutdown [--force]",
		Short: "Stop the daemon for good, deleting every device",
		Long: "Destroys the snapshots, stops every filtered device and image, flushes the\n" +
			"backings and ends the daemon. It is refused while a device or image is\n" +
			"mounted or open (the error names who holds it) unless --force.\n\n" +
			"SIGTERM to the daemon is a restart instead: the filtered devices stay, their\n" +
			"I/O waits, and the next daemon serves them again.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := g.client().Shutdown(cmd.Context(), force); err != nil {
				return fmt.Errorf("shutdown: %w", err)
			}
			return nil
		},
	}
	cmd.Flags().BoolVar(&force, "force", false, "stop even while a device or image is mounted or open")
	return cmd
}
