package main

import (
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

func statusCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "status",
		Short: "Show devices and snapshots",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			s, err := g.client().Status(cmd.Context())
			if err != nil {
				return fmt.Errorf("status: %w", err)
			}
			return g.output(cmd, s, func(w io.Writer) error { return statusText(w, s) })
		},
	}
}

// statusText prints the daemon's state as two readable tables.
func statusText(w io.Writer, s api.Status) error {
	tw := tabwriter.NewWriter(w, 2, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "DEVICE\tNAME\tSIZE\tBACKING\tIO\tSNAPSHOT\n")
	for _, d := range s.Devices {
		io := d.IOMode
		if d.DirectIO {
			io += ",direct"
		} else {
			io += ",buffered"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", d.Path, d.Name, bytesText(d.Size), d.Backing, io, orDash(d.Snapshot))
	}
	fmt.Fprintln(tw)
	fmt.Fprintf(tw, "SNAPSHOT\tSTATE\tSTORAGE USED/CAPACITY/LIMIT\tDEVICE\tIMAGE\tCHUNK\tCOPIED\tERROR\n")
	for _, sn := range s.Snapshots {
		storage := strings.Join([]string{bytesText(sn.Storage.Used), bytesText(sn.Storage.Capacity), bytesText(sn.Storage.Limit)}, " / ")
		if len(sn.Devices) == 0 {
			fmt.Fprintf(tw, "%s\t%s\t%s\t-\t-\t-\t-\t-\n", sn.ID, sn.State, storage)
		}
		for i, m := range sn.Devices {
			id, state := sn.ID, sn.State
			if i > 0 {
				id, state, storage = "", "", ""
			}
			copied := strconv.FormatUint(m.ChunksCopied, 10)
			if m.ChunksInMemory > 0 { // copied, not yet counted in the storage's used bytes
				copied += fmt.Sprintf(" (%d in memory)", m.ChunksInMemory)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", id, state, storage, m.Device, orDash(m.Image),
				bytesText(m.ChunkSize), copied, m.ErrorCode)
		}
	}
	if len(s.Unrecovered) > 0 {
		fmt.Fprintln(tw)
		fmt.Fprintf(tw, "NOT RECOVERED\tNAME\tBACKING\tERROR\n")
		for _, u := range s.Unrecovered {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", u.Device, u.Name, u.Backing, u.Error)
		}
	}
	if failed := notAttached(s.Declared); len(failed) > 0 {
		fmt.Fprintln(tw)
		fmt.Fprintf(tw, "DECLARED, NOT ATTACHED\tNAME\tBACKING\tERROR\n")
		for _, d := range failed {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\n", d.Source, orDash(d.Name), orDash(d.Backing), d.Error)
		}
	}
	return tw.Flush()
}

// notAttached returns the declared devices that no filtered device serves.
func notAttached(decls []api.Declared) []api.Declared {
	var out []api.Declared
	for _, d := range decls {
		if d.Device == "" {
			out = append(out, d)
		}
	}
	return out
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
