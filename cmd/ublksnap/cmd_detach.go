package main

import (
	"errors"
	"fmt"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/internal/devconf"
)

func detachCmd(g *globalFlags) *cobra.Command {
	var device string
	var force, persist bool
	cmd := &cobra.Command{
		Use:   "detach --device DEV [--force] [--persist]",
		Short: "Stop a filtered device (it must not be in a snapshot)",
		Long: "Stops the device and flushes its backing. It is refused while the device\n" +
			"is mounted or open (the error names who holds it) unless --force, which\n" +
			"tears the disk out from under its users. With --persist its declaration\n" +
			"leaves the devices file too (DEV may then be the declared name of a device\n" +
			"that is not attached).",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "device"); err != nil {
				return err
			}
			c := g.client()
			name := device
			if persist { // the declaration goes by name
				if st, err := c.Status(cmd.Context()); err == nil {
					for _, d := range st.Devices {
						if d.Path == device || d.Name == device {
							name = d.Name
						}
					}
				}
			}
			err := c.Detach(cmd.Context(), device, force)
			var apiErr *api.Error
			notAttached := errors.As(err, &apiErr) && apiErr.Code == api.CodeNotFound
			if err != nil && !(persist && notAttached) {
				return fmt.Errorf("detach %s: %w", device, err)
			}
			if !persist {
				return nil
			}
			switch rerr := devconf.Remove(g.devicesFile, name); {
			case errors.Is(rerr, devconf.ErrNotDeclared) && notAttached:
				return fmt.Errorf("detach %s: %w, and %s declares no device %s", device, err, g.devicesFile, name)
			case errors.Is(rerr, devconf.ErrNotDeclared):
				fmt.Fprintf(cmd.ErrOrStderr(), "%s was not declared in %s\n", name, g.devicesFile)
			case rerr != nil:
				return fmt.Errorf("%s is detached, but still declared: %w", device, rerr)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&device, "device", "", "filtered device, e.g. /dev/ublkb0 (required)")
	cmd.Flags().BoolVar(&force, "force", false, "detach even while the device is mounted or open")
	cmd.Flags().BoolVar(&persist, "persist", false, "also remove its declaration from the devices file")
	return cmd
}
