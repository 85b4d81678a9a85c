package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func snapshotTakeCmd(g *globalFlags) *cobra.Command {
	return idCmd("take --id UUID", "Take the snapshot; prints each member device and its image",
		func(cmd *cobra.Command, id string) error {
			s, err := g.client().Take(cmd.Context(), id)
			if err != nil {
				return fmt.Errorf("take snapshot %s: %w", id, err)
			}
			return g.printSnapshot(cmd, s)
		})
}
