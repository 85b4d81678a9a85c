package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

func snapshotAppendStorageCmd(g *globalFlags) *cobra.Command {
	var storage string
	var ranges []string
	cmd := idCmd("append-storage --id UUID --storage PATH [--ranges START:COUNT ...]",
		"Add a file or block device (or sector ranges of it) to a snapshot's difference storage",
		func(cmd *cobra.Command, id string) error {
			if err := required(cmd, "storage"); err != nil {
				return err
			}
			req := api.AppendStorageRequest{}
			var err error
			if req.Path, err = absPath("storage", storage); err != nil {
				return err
			}
			if req.Ranges, err = parseRanges(ranges); err != nil {
				return err
			}
			s, err := g.client().AppendStorage(cmd.Context(), id, req)
			if err != nil {
				return fmt.Errorf("append %s to snapshot %s: %w", req.Path, id, err)
			}
			return g.output(cmd, s, func(w io.Writer) error {
				_, err := fmt.Fprintf(w, "storage %s of %s, %s used\n", bytesText(s.Storage.Capacity),
					bytesText(s.Storage.Limit), bytesText(s.Storage.Used))
				return err
			})
		})
	cmd.Flags().StringVar(&storage, "storage", "", "file or block device to add (required)")
	cmd.Flags().StringArrayVar(&ranges, "ranges", nil, "sector ranges START:COUNT (default: all of it)")
	return cmd
}
