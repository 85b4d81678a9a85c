package main

import (
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

func snapshotWaitEventCmd(g *globalFlags) *cobra.Command {
	var timeout string
	cmd := idCmd("wait-event --id UUID [--timeout DURATION]", "Wait for the snapshot's next event",
		func(cmd *cobra.Command, id string) error {
			d, err := parseTimeout(timeout)
			if err != nil {
				return err
			}
			e, err := g.client().WaitEvent(cmd.Context(), id, d)
			if err != nil {
				return fmt.Errorf("wait for an event of snapshot %s: %w", id, err)
			}
			return g.output(cmd, e, func(w io.Writer) error {
				_, err := fmt.Fprintln(w, eventText(e))
				return err
			})
		})
	cmd.Flags().StringVar(&timeout, "timeout", "1s", "how long to wait: 500ms, 10s, or milliseconds")
	return cmd
}

// eventText is the one-line form of an event.
func eventText(e api.Event) string {
	switch e.Code {
	case api.EventLowFreeSpace:
		return fmt.Sprintf("low_free_space requested=%s (%d sectors)", bytesText(e.RequestedSectors*512), e.RequestedSectors)
	case api.EventCorrupted:
		return fmt.Sprintf("corrupted device=%s errno=%d (%s)", e.Device, e.Errno, e.Error)
	default:
		return e.Code
	}
}
