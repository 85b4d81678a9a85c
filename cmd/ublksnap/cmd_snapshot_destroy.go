package main

import (
	"fmt"

	"github.com/spf13/cobra"
)

func snapshotDestroyCmd(g *globalFlags) *cobra.Command {
	var force bool
	cmd := idCmd("destroy --id UUID [--force]", "Remove the snapshot's images and release its storage",
		func(cmd *cobra.Command, id string) error {
			if err := g.client().Destroy(cmd.Context(), id, force); err != nil {
				return fmt.Errorf("destroy snapshot %s: %w", id, err)
			}
			return nil
		})
	cmd.Flags().BoolVar(&force, "force", false, "destroy even while an image is open or mounted")
	return cmd
}
