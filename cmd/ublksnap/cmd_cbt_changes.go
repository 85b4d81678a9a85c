package main

import (
	"fmt"
	"io"

	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cbt"
	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

// changesOutput is what cbt changes prints with --json.
type changesOutput struct {
	Device     string       `json:"device"`
	Full       bool         `json:"full"` // the point is of another generation: everything
	Generation string       `json:"generation"`
	Changes    uint8        `json:"changes"`
	Extents    []cbt.Extent `json:"extents"`
}

func cbtChangesCmd(g *globalFlags) *cobra.Command {
	var device, since string
	cmd := &cobra.Command{
		Use:   "changes --device DEV --since GENERATION:NUMBER",
		Short: "List the byte ranges changed since a generation and changes number, or \"full\"",
		Long: `List the byte ranges (OFFSET LENGTH, merged) of the tracking blocks changed
since GENERATION:NUMBER, as recorded by an earlier backup (cbt info after its
take). When the generation differs the history is lost: it prints "full" and
one range covering the device.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "device", "since"); err != nil {
				return err
			}
			p, err := cbt.ParsePoint(since)
			if err != nil {
				return usagef("--since %v", err)
			}
			m, err := g.client().CBTMap(cmd.Context(), device)
			if err != nil {
				return fmt.Errorf("cbt changes of %s: %w", device, err)
			}
			ext, full, err := changedExtents(m, p)
			if err != nil {
				return fmt.Errorf("cbt changes of %s: %w", device, err)
			}
			out := changesOutput{Device: device, Full: full, Generation: m.Generation, Changes: m.Changes, Extents: ext}
			return g.output(cmd, out, func(w io.Writer) error {
				if full {
					fmt.Fprintln(w, "full")
				}
				for _, e := range ext {
					fmt.Fprintf(w, "%d %d\n", e.Offset, e.Length)
				}
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&device, "device", "", "filtered device, e.g. /dev/ublkb0 (required)")
	cmd.Flags().StringVar(&since, "since", "", "GENERATION:NUMBER of the last backup (required)")
	return cmd
}

// changedExtents returns the extents of map m changed since p, never nil
// (--json prints "extents": [] when nothing changed).
func changedExtents(m api.CBTMap, p cbt.Point) ([]cbt.Extent, bool, error) {
	info, err := cbtInfoOf(m)
	if err != nil {
		return nil, false, err
	}
	ext, full := cbt.Changed(m.Map, info, p)
	if ext == nil {
		ext = []cbt.Extent{}
	}
	return ext, full, nil
}

// cbtInfoOf returns the description of the change-tracking map m.
func cbtInfoOf(m api.CBTMap) (cbt.Info, error) {
	gen, err := uuid.Parse(m.Generation)
	if err != nil {
		return cbt.Info{}, fmt.Errorf("the daemon sent generation %q: %w", m.Generation, err)
	}
	return cbt.Info{BlockSize: m.BlockSize, BlockCount: m.BlockCount, Capacity: m.Capacity, Generation: gen, Changes: m.Changes}, nil
}
