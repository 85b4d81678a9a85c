package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"
)

func snapshotCollectCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "collect",
		Short: "List the snapshot UUIDs",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ids, err := g.client().Snapshots(cmd.Context())
			if err != nil {
				return fmt.Errorf("collect snapshots: %w", err)
			}
			return g.output(cmd, ids, func(w io.Writer) error {
				for _, id := range ids {
					fmt.Fprintln(w, id)
				}
				return nil
			})
		},
	}
}
