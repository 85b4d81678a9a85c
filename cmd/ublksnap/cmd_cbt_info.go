package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

func cbtCmd(g *globalFlags) *cobra.Command {
	c := &cobra.Command{
		Use:   "cbt",
		Short: "Change block tracking: what changed on a device between snapshots",
		Args:  noArgs,
		RunE:  func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	c.AddCommand(cbtInfoCmd(g), cbtReadCmd(g), cbtChangesCmd(g), cbtMarkDirtyCmd(g))
	return c
}

func cbtInfoCmd(g *globalFlags) *cobra.Command {
	var device string
	cmd := &cobra.Command{
		Use:   "info --device DEV",
		Short: "Show the tracking block size and count, generation and changes number of a device",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "device"); err != nil {
				return err
			}
			i, err := g.client().CBTInfo(cmd.Context(), device)
			if err != nil {
				return fmt.Errorf("cbt info of %s: %w", device, err)
			}
			return g.output(cmd, i, func(w io.Writer) error {
				_, err := fmt.Fprintf(w, "block_size=%d (%s)\nblock_count=%d\ndevice_capacity=%d (%s)\ngeneration=%s\nchanges_number=%d\n",
					i.BlockSize, bytesText(uint64(i.BlockSize)), i.BlockCount, i.Capacity, bytesText(uint64(i.Capacity)), i.Generation, i.Changes)
				return err
			})
		},
	}
	cmd.Flags().StringVar(&device, "device", "", "filtered device, e.g. /dev/ublkb0 (required)")
	return cmd
}
