package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

func snapshotCreateCmd(g *globalFlags) *cobra.Command {
	var devices []string
	var storage, limit string
	var force bool
	cmd := &cobra.Command{
		Use:   "create [--device DEV ...] --storage PATH --limit SIZE [--force]",
		Short: "Create a snapshot and its difference storage; prints its UUID",
		Long: "PATH is a file (grown up to SIZE; one that does not exist is created and\n" +
			"removed with the snapshot), a directory (an unnamed temporary file in it,\n" +
			"gone with the snapshot) or a block device (used up to SIZE). An existing\n" +
			"file that holds data is refused unless --force: it would be overwritten.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "storage", "limit"); err != nil {
				return err
			}
			req := api.CreateSnapshotRequest{Devices: devices, Force: force}
			var err error
			if req.Storage, err = absPath("storage", storage); err != nil {
				return err
			}
			if req.Limit, err = parseSize("limit", limit); err != nil {
				return err
			}
			s, err := g.client().CreateSnapshot(cmd.Context(), req)
			if err != nil {
				return fmt.Errorf("create snapshot: %w", err)
			}
			return g.output(cmd, s, func(w io.Writer) error {
				_, err := fmt.Fprintln(w, s.ID)
				return err
			})
		},
	}
	cmd.Flags().StringArrayVar(&devices, "device", nil, "filtered device to include (repeatable)")
	cmd.Flags().StringVar(&storage, "storage", "", "difference storage: file, directory or block device (required)")
	cmd.Flags().StringVar(&limit, "limit", "", "most space the difference storage may take, e.g. 4GiB (required)")
	cmd.Flags().BoolVar(&force, "force", false, "use an existing file that holds data as the storage, overwriting it")
	return cmd
}
