package main

import (
	"fmt"
	"os"

	"github.com/spf13/cobra"
)

func cbtReadCmd(g *globalFlags) *cobra.Command {
	var device, output string
	cmd := &cobra.Command{
		Use:   "read --device DEV [--output FILE]",
		Short: "Write the raw read map of a device: one byte per tracking block, the number of the take it last changed before",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "device"); err != nil {
				return err
			}
			m, err := g.client().CBTMap(cmd.Context(), device)
			if err != nil {
				return fmt.Errorf("cbt read of %s: %w", device, err)
			}
			if output == "" || output == "-" {
				_, err = cmd.OutOrStdout().Write(m.Map)
				return err
			}
			if err := os.WriteFile(output, m.Map, 0o644); err != nil {
				return fmt.Errorf("cbt read of %s: %w", device, err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&device, "device", "", "filtered device, e.g. /dev/ublkb0 (required)")
	cmd.Flags().StringVarP(&output, "output", "o", "", "file to write (default standard output)")
	return cmd
}
