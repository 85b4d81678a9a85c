package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/internal/devconf"
)

// addCommands adds the client subcommands and their shared flags to root.
func addCommands(root *cobra.Command) {
	g := &globalFlags{}
	root.PersistentFlags().StringVar(&g.socket, "socket", "", "daemon socket (default $"+api.SocketEnv+" or "+api.DefaultSocket+")")
	root.PersistentFlags().BoolVar(&g.json, "json", false, "print JSON for scripts")
	root.PersistentFlags().StringVar(&g.devicesFile, "devices-file", devconf.DefaultPath, "the declared devices, attached at the daemon's start (see `ublksnap attach --persist`)")
	snap := &cobra.Command{
		Use:   "snapshot",
		Short: "Create, take, watch and destroy snapshots",
		Args:  noArgs, // an unknown subcommand is a usage error, not help
		RunE:  func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	snap.AddCommand(snapshotCreateCmd(g), snapshotAddCmd(g), snapshotAppendStorageCmd(g), snapshotTakeCmd(g),
		snapshotWaitEventCmd(g), snapshotWatchCmd(g), snapshotCollectCmd(g), snapshotInfoCmd(g), snapshotDestroyCmd(g))
	root.AddCommand(attachCmd(g), detachCmd(g), snap, cbtCmd(g), backupCmd(g), restoreCmd(g), exportCmd(g), statusCmd(g), waitReadyCmd(g), daemonCmd(g), shutdownCmd(g), newDevCmd(), freezeHolderCmd())
}

// idCmd builds a command that needs --id UUID and calls run with it.
func idCmd(use, short string, run func(cmd *cobra.Command, id string) error) *cobra.Command {
	var id string
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "id"); err != nil {
				return err
			}
			id, err := parseID(id)
			if err != nil {
				return err
			}
			return run(cmd, id)
		},
	}
	cmd.Flags().StringVar(&id, "id", "", "snapshot UUID (required)")
	return cmd
}

// printSnapshot prints a snapshot's members and images.
func (g *globalFlags) printSnapshot(cmd *cobra.Command, s api.Snapshot) error {
	return g.output(cmd, s, func(w io.Writer) error {
		for _, m := range s.Devices {
			if m.Image != "" {
				fmt.Fprintf(w, "%s %s\n", m.Device, m.Image)
			} else {
				fmt.Fprintln(w, m.Device)
			}
		}
		return nil
	})
}
