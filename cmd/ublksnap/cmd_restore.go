package main

import (
	"fmt"
	"io"
	"time"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/backup"
)

// restoreResult is what restore prints.
type restoreResult struct {
	Output  string  `json:"output"`
	Size    int64   `json:"size"`    // bytes of the image
	Links   int     `json:"links"`   // backups in the chain
	Read    int64   `json:"read"`    // bytes read and checked
	Seconds float64 `json:"seconds"` //
}

func restoreCmd(g *globalFlags) *cobra.Command {
	var manifest, output string
	cmd := &cobra.Command{
		Use:   "restore --manifest MANIFEST --output PATH",
		Short: "Rebuild a device image from a backup and the chain of backups before it",
		Long: `Rebuild at PATH (a new file) the image that the backup of MANIFEST copied,
from the full backup and the incremental ones its chain names. Every extent
of every backup is checked against its checksum; PATH appears only if all of
them match. A missing or altered backup is an error that names it.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "manifest", "output"); err != nil {
				return err
			}
			start := time.Now()
			m, err := backup.Load(manifest)
			if err != nil {
				return fmt.Errorf("restore: %w", err)
			}
			chain, err := backup.Chain(m)
			if err != nil {
				return fmt.Errorf("restore: %w", err)
			}
			var total int64
			for _, l := range chain {
				total += l.Bytes()
			}
			p := newProgress(cmd.OutOrStdout(), cmd.ErrOrStderr(), g.json, "restore", total)
			read, err := backup.Restore(cmd.Context(), chain, output, func(done, _ int64) { p.Set(done) })
			p.Finish()
			if err != nil {
				return err // it says "restore: ..." or names the broken link
			}
			res := restoreResult{Output: output, Size: m.DeviceSize, Links: len(chain), Read: read, Seconds: time.Since(start).Seconds()}
			return printResult(cmd, g.json, res, func(w io.Writer) {
				fmt.Fprintf(w, "restored %s (%s) from %d backups in %.1fs\n", output, bytesText(uint64(res.Size)), res.Links, res.Seconds)
			})
		},
	}
	cmd.Flags().StringVar(&manifest, "manifest", "", "manifest.json of the backup to restore (required)")
	cmd.Flags().StringVarP(&output, "output", "o", "", "new file for the image (required)")
	return cmd
}
