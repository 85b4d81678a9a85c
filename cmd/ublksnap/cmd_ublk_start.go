package main

import (
	"strconv"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/ublk"
)

// ublkStartName is the hidden command the daemon runs to send an image's
// START_DEV from a process of its own (ublk.Config.Starter).
const ublkStartName = "ublk-start"

func ublkStartCmd() *cobra.Command {
	return &cobra.Command{
		Use:    ublkStartName + " DEV_ID SERVER_PID",
		Short:  "Send START_DEV for a ublk device served by another process (run by the daemon)",
		Hidden: true,
		Args:   cobra.ExactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			id, err := strconv.ParseUint(args[0], 10, 32)
			if err != nil {
				return usagef("device id %q: %v", args[0], err)
			}
			pid, err := strconv.Atoi(args[1])
			if err != nil {
				return usagef("server pid %q: %v", args[1], err)
			}
			return ublk.StartDev(uint32(id), pid)
		},
	}
}
