package main

import (
	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/host"
)

// freezeHolderName is the hidden command the daemon runs to freeze
// filesystems from a process of their own (host.RunFreezeHolder).
const freezeHolderName = "freeze-holder"

func freezeHolderCmd() *cobra.Command {
	return &cobra.Command{
		Use:    freezeHolderName + " MOUNTPOINT...",
		Short:  "Freeze filesystems until standard input ends (run by the daemon)",
		Hidden: true,
		Args:   cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return host.RunFreezeHolder(args, cmd.InOrStdin(), cmd.OutOrStdout())
		},
	}
}
