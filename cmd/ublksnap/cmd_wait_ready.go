package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

func waitReadyCmd(g *globalFlags) *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:   "wait-ready [--timeout D]",
		Short: "Wait until the daemon answers, then fail if a declared device is not attached",
		Long: "The daemon attaches the devices of its devices file before it answers its\n" +
			"first request. wait-ready waits (up to --timeout) for that answer and exits\n" +
			"0 when every declared device is attached, 1 naming those that are not (a\n" +
			"line with a mistake, a backing missing): for scripts and units that must\n" +
			"not go on without them.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			st, err := statusOnceUp(ctx, g.client())
			if err != nil {
				return fmt.Errorf("wait-ready: the daemon did not answer within %v: %w", timeout, err)
			}
			failed := notAttached(st.Declared)
			err = g.output(cmd, st.Declared, func(w io.Writer) error {
				for _, d := range st.Declared {
					if d.Device != "" {
						fmt.Fprintf(w, "%s\t%s\n", d.Name, d.Device)
					}
				}
				return nil
			})
			if err != nil || len(failed) == 0 {
				return err
			}
			var msgs []string
			for _, d := range failed {
				msgs = append(msgs, fmt.Sprintf("%s: %s", d.Source, d.Error))
			}
			return fmt.Errorf("declared devices not attached:\n  %s", strings.Join(msgs, "\n  "))
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 90*time.Second, "how long to wait for the daemon")
	return cmd
}

// statusOnceUp asks for the status until the daemon answers or ctx ends.
// A daemon not listening yet is retried; any other failure is returned.
func statusOnceUp(ctx context.Context, c *api.Client) (api.Status, error) {
	retry := time.NewTicker(100 * time.Millisecond)
	defer retry.Stop()
	for {
		st, err := c.Status(ctx)
		var apiErr *api.Error
		if err == nil || errors.As(err, &apiErr) {
			return st, err
		}
		select {
		case <-ctx.Done():
			return api.Status{}, errors.Join(ctx.Err(), err)
		case <-retry.C:
		}
	}
}
