package main

import (
	"context"
	"errors"
	"fmt"
	"io"
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
		"Print the snapshot's events until it ends; with --grow-dir, answer low_free_space by adding storage files (removed when the watch ends)",
		func(cmd *cobra.Command, id string) error {
			st := stretcher{id: id}
			if cmd.Flags().Changed("grow-dir") || cmd.Flags().Changed("grow-limit") {
				if err := required(cmd, "grow-dir", "grow-limit"); err != nil {
					return err
				}
				var err error
				if st.dir, err = absPath("grow-dir", growDir); err != nil {
					return err
				}
				if st.limit, err = parseSize("grow-limit", growLimit); err != nil {
					return err
				}
				// Found wrong now rather than when the storage runs low.
				if fi, err := os.Stat(st.dir); err != nil {
					return fmt.Errorf("--grow-dir: %w", err)
				} else if !fi.IsDir() {
					return fmt.Errorf("--grow-dir %s is not a directory", st.dir)
				}
			}
			w := &watch{daemon: g.client(), id: id, grow: &st, out: cmd.OutOrStdout(), errOut: cmd.ErrOrStderr(), json: g.json}
			return w.run(cmd.Context())
		})
	cmd.Long = "Prints each event of the snapshot until it is destroyed (or the watch is\n" +
		"interrupted). With --grow-dir, each low_free_space is answered with a new\n" +
		"file in DIR, ublksnap-UUID-N.diff (a name taken by anything else is\n" +
		"skipped), appended to the difference storage, until the files reach\n" +
		"--grow-limit; the watch removes its files when it ends (the daemon keeps\n" +
		"them open until the snapshot is destroyed). DIR must not be on a filtered\n" +
		"device: the daemon refuses storage there."
	cmd.Flags().StringVar(&growDir, "grow-dir", "", "directory for new difference storage files")
	cmd.Flags().StringVar(&growLimit, "grow-limit", "", "most space the files in --grow-dir may take in all, e.g. 20GiB")
	return cmd
}

// stretcher answers low_free_space events by adding files to the difference
// storage, as blksnap's stretch_snapshot did; dir empty means it does not.
// Its files are named after the snapshot and numbered, created exclusively
// (a name taken by anything else is skipped), and removed by removeAll when
// the watch ends: the daemon keeps the files it was given open until the
// snapshot is destroyed, so their space comes back then.
type stretcher struct {
	id    string   // the snapshot's UUID, part of every file name
	dir   string   // where new files go
	limit uint64   // bytes all new files may take
	used  uint64   // bytes taken so far
	n     int      // the last number tried
	files []string // the files made so far
}

// maxNameTries bounds the names grow tries before it gives up.
const maxNameTries = 1000

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
	var f *os.File
	var path string
	for tries := 0; f == nil; tries++ {
		if tries == maxNameTries {
			return "", fmt.Errorf("grow storage: %d names in %s are taken", maxNameTries, s.dir)
		}
		s.n++
		path = filepath.Join(s.dir, fmt.Sprintf("ublksnap-%s-%d.diff", s.id, s.n))
		var err error
		f, err = os.OpenFile(path, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil && !errors.Is(err, os.ErrExist) {
			return "", fmt.Errorf("grow storage: %w", err)
		}
	}
	defer f.Close()
	if err := unix.Fallocate(int(f.Fd()), 0, 0, int64(size)); err != nil {
		os.Remove(path)
		return "", fmt.Errorf("grow storage: fallocate %s of %s: %w", bytesText(size), path, err)
	}
	s.used += size
	s.files = append(s.files, path)
	return path, nil
}

// removeAll removes the files grow made.
func (s *stretcher) removeAll() error {
	var errs []error
	for _, p := range s.files {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	s.files = nil
	return errors.Join(errs...)
}

// snapshotEvents is what a watch asks of the daemon; *api.Client has it.
type snapshotEvents interface {
	WaitEvent(ctx context.Context, id string, timeout time.Duration) (api.Event, error)
	AppendStorage(ctx context.Context, id string, req api.AppendStorageRequest) (api.Snapshot, error)
}

// watch is one run of snapshot watch: it prints a snapshot's events until
// the snapshot ends or ctx does, answering low_free_space through grow.
type watch struct {
	daemon snapshotEvents // the daemon the snapshot lives in
	id     string         // the snapshot's UUID
	grow   *stretcher     // makes the storage files; its dir empty: none
	out    io.Writer      // the events, and in text mode the files added
	errOut io.Writer      // why the watch ended
	json   bool           // events as JSON objects instead of lines
}

// run watches until the snapshot is gone (nil) or ctx ends (nil), or a
// request fails, and then removes the files it made in every case.
func (w *watch) run(ctx context.Context) (err error) {
	defer func() {
		if rerr := w.grow.removeAll(); rerr != nil && err == nil {
			err = fmt.Errorf("remove the storage files of snapshot %s: %w", w.id, rerr)
		}
	}()
	for {
		e, err := w.daemon.WaitEvent(ctx, w.id, time.Second)
		if end, err := w.ends(ctx, err, "watch snapshot"); end {
			return err
		}
		if e.Code == api.EventTimeout {
			continue
		}
		if err := writeOutput(w.out, w.json, e, func(out io.Writer) error {
			_, err := fmt.Fprintf(out, "%s %s\n", e.Time.Format(time.RFC3339), eventText(e))
			return err
		}); err != nil {
			return err
		}
		if e.Code == api.EventLowFreeSpace {
			path, err := w.grow.grow(e.RequestedSectors * 512)
			if err != nil {
				return err
			}
			if path != "" {
				_, err := w.daemon.AppendStorage(ctx, w.id, api.AppendStorageRequest{Path: path})
				if end, err := w.ends(ctx, err, "append "+path+" to snapshot"); end {
					return err
				}
				if !w.json {
					fmt.Fprintf(w.out, "added %s (%s of %s grown)\n", path, bytesText(w.grow.used), bytesText(w.grow.limit))
				}
			}
		}
	}
}

// ends sorts the outcome of a request: the watch goes on (false), ends
// quietly because the snapshot is gone or ctx ended (true, nil), or fails
// (true, the error, saying what it was doing).
func (w *watch) ends(ctx context.Context, err error, doing string) (bool, error) {
	switch {
	case err == nil:
		return false, nil
	case snapshotGone(err):
		fmt.Fprintf(w.errOut, "snapshot %s is gone; watch ends\n", w.id)
		return true, nil
	case ctx.Err() != nil:
		return true, nil
	}
	return true, fmt.Errorf("%s %s: %w", doing, w.id, err)
}

// snapshotGone reports whether the daemon answered that the snapshot does
// not exist (any more): destroyed, the watch is over.
func snapshotGone(err error) bool {
	var apiErr *api.Error
	return errors.As(err, &apiErr) && apiErr.Code == api.CodeNotFound
}
