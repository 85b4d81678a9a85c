package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

func snapshotWatchCmd(g *globalFlags) *cobra.Command {
	var growDir, growLimit string
	cmd := idCmd("watch --id UUID [--grow-dir DIR --grow-limit SIZE]",
		"Print the snapshot's events until it ends; with --grow-dir, answer low_free_space by adding storage files",
		func(cmd *cobra.Command, id string) error {
			var st stretcher
			if growDir != "" {
				if err := required(cmd, "grow-limit"); err != nil {
					return err
				}
				var err error
				if st.dir, err = absPath("grow-dir", growDir); err != nil {
					return err
				}
				if st.limit, err = parseSize("grow-limit", growLimit); err != nil {
					return err
				}
			}
			return g.watch(cmd, id, &st)
		})
	cmd.Flags().StringVar(&growDir, "grow-dir", "", "directory for new difference storage files")
	cmd.Flags().StringVar(&growLimit, "grow-limit", "", "most space the files in --grow-dir may take in all")
	return cmd
}

// stretcher answers low_free_space events by adding files to the difference
// storage, as blksnap's stretch_snapshot did; dir empty means it does not.
type stretcher struct {
	dir   string // where new files go
	limit uint64 // bytes all new files may take
	used  uint64 // bytes taken so far
	n     int    // files made so far
}

// grow makes a file of at least want bytes and returns its path, or "" when
// the limit is reached.
func (s *stretcher) grow(want uint64) (string, error) {
	if s.dir == "" || s.used >= s.limit {
		return "", nil
	}
	size := min(max(want, 1<<20), s.limit-s.used)
	size &^= 4095
	if size == 0 {
		return "", nil
	}
	s.n++
	path := filepath.Join(s.dir, fmt.Sprintf("diff_storage#%d", s.n))
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return "", fmt.Errorf("grow storage: %w", err)
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), 0, 0, int64(size)); err != nil {
		os.Remove(path)
		return "", fmt.Errorf("grow storage: fallocate %s of %s: %w", bytesText(size), path, err)
	}
	s.used += size
	return path, nil
}

func (g *globalFlags) watch(cmd *cobra.Command, id string, st *stretcher) error {
	c := g.client()
	ctx := cmd.Context()
	w := cmd.OutOrStdout()
	for {
		e, err := c.WaitEvent(ctx, id, 1000)
		var apiErr *api.Error
		switch {
		case errors.As(err, &apiErr) && apiErr.Status == http.StatusNotFound:
			fmt.Fprintf(cmd.ErrOrStderr(), "snapshot %s is gone; watch ends\n", id)
			return nil
		case ctx.Err() != nil:
			return nil
		case err != nil:
			return fmt.Errorf("watch snapshot %s: %w", id, err)
		case e.Code == api.EventTimeout:
			continue
		}
		if err := g.output(cmd, e, func(w io.Writer) error {
			_, err := fmt.Fprintf(w, "%s %s\n", e.Time.Format(time.RFC3339), eventText(e))
			return err
		}); err != nil {
			return err
		}
		if e.Code == api.EventLowFreeSpace {
			path, err := st.grow(e.RequestedSectors * 512)
			if err != nil {
				return err
			}
			if path != "" {
				if _, err := c.AppendStorage(ctx, id, api.AppendStorageRequest{Path: path}); err != nil {
					return fmt.Errorf("append %s to snapshot %s: %w", path, id, err)
				}
				if !g.json {
					fmt.Fprintf(w, "added %s (%s of %s grown)\n", path, bytesText(st.used), bytesText(st.limit))
				}
			}
		}
	}
}
