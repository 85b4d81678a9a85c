package main

import (
	"fmt"
	"io"
	"net"
	"net/url"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

func exportCmd(g *globalFlags) *cobra.Command {
	var req api.ExportRequest
	cmd := &cobra.Command{
		Use:   "export --id UUID [--device DEV] [--listen unix:PATH|tcp:HOST:PORT] [--name NAME]",
		Short: "Export the images of a taken snapshot over NBD, read-only, with change tracking as dirty bitmaps",
		Long: `Export the images of a taken snapshot over NBD (read-only), one export per
image, named after its device. Clients select the metadata context
base:allocation and, for an incremental backup, qemu:dirty-bitmap:since-GENERATION-N:
the blocks changed since the take whose change tracking point was
GENERATION:N (see ublksnap cbt info). The export ends with 'export stop', when
the snapshot is destroyed, or when the daemon stops.

The default listener is a unix socket beside the daemon's socket. TCP is
accepted on loopback addresses only, unless --allow-remote: NBD here has
neither TLS nor authentication.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "id"); err != nil {
				return err
			}
			id, err := parseID(req.Snapshot)
			if err != nil {
				return err
			}
			req.Snapshot = id
			if req.Listen == "" {
				req.Listen = "unix:" + filepath.Join(filepath.Dir(api.SocketPath(g.socket)), "nbd-"+id[:8]+".sock")
			}
			if err := checkListen(req.Listen); err != nil {
				return err
			}
			e, err := g.client().StartExport(cmd.Context(), req)
			if err != nil {
				return fmt.Errorf("export snapshot %s: %w", id, err)
			}
			return g.output(cmd, e, func(w io.Writer) error { return printExport(w, e) })
		},
	}
	cmd.Flags().StringVar(&req.Snapshot, "id", "", "snapshot UUID (required)")
	cmd.Flags().StringVar(&req.Device, "device", "", "export only the image of this filtered device")
	cmd.Flags().StringVar(&req.Listen, "listen", "", "unix:PATH (absolute) or tcp:HOST:PORT (default: a unix socket beside the daemon's)")
	cmd.Flags().StringVar(&req.Name, "name", "", "export name of the one image (default: the device's name)")
	cmd.Flags().BoolVar(&req.AllowRemote, "allow-remote", false, "accept a TCP address that is not loopback")
	cmd.AddCommand(exportListCmd(g), exportStopCmd(g))
	return cmd
}

func exportListCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "list",
		Short: "List the running NBD exports",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			es, err := g.client().Exports(cmd.Context())
			if err != nil {
				return fmt.Errorf("list exports: %w", err)
			}
			return g.output(cmd, es, func(w io.Writer) error {
				for _, e := range es {
					if err := printExport(w, e); err != nil {
						return err
					}
				}
				return nil
			})
		},
	}
}

func exportStopCmd(g *globalFlags) *cobra.Command {
	var listen string
	cmd := &cobra.Command{
		Use:   "stop --listen ADDRESS",
		Short: "End an NBD export and disconnect its clients",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "listen"); err != nil {
				return err
			}
			if err := g.client().StopExport(cmd.Context(), listen); err != nil {
				return fmt.Errorf("stop export on %s: %w", listen, err)
			}
			return g.output(cmd, struct{}{}, func(io.Writer) error { return nil })
		},
	}
	cmd.Flags().StringVar(&listen, "listen", "", "the listen address the export was started with (required)")
	return cmd
}

// checkListen rejects a malformed listen address as a usage error.
func checkListen(listen string) error {
	kind, addr, _ := strings.Cut(listen, ":")
	switch kind {
	case "unix":
		if filepath.IsAbs(addr) {
			return nil
		}
	case "tcp":
		if _, _, err := net.SplitHostPort(addr); err == nil {
			return nil
		}
	}
	return usagef("--listen %q: want unix:/ABSOLUTE/PATH or tcp:HOST:PORT", listen)
}

// printExport prints one line per export name, with the URI clients use.
func printExport(w io.Writer, e api.Export) error {
	for _, m := range e.Exports {
		line := fmt.Sprintf("export=%s device=%s size=%d (%s) uri=%s", m.Name, m.Device, m.Size, bytesText(m.Size), exportURI(e.Address, m.Name))
		if m.Bitmap != "" {
			line += " bitmap=" + m.Bitmap
		}
		if _, err := fmt.Fprintln(w, line); err != nil {
			return err
		}
	}
	return nil
}

// exportURI is the NBD URI of export name at address (unix:PATH or
// tcp:HOST:PORT), as libnbd and qemu take it.
func exportURI(address, name string) string {
	kind, addr, _ := strings.Cut(address, ":")
	if kind == "unix" {
		return "nbd+unix:///" + url.PathEscape(name) + "?socket=" + addr
	}
	return "nbd://" + addr + "/" + url.PathEscape(name)
}
