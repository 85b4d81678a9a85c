package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/backup"
	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

// backupResult is what backup prints.
type backupResult struct {
	Manifest   string  `json:"manifest"`
	Full       bool    `json:"full"`
	Reason     string  `json:"reason,omitempty"` // why a full backup was made with --since
	Bytes      int64   `json:"bytes"`            // bytes copied
	DeviceSize int64   `json:"device_size"`
	Generation string  `json:"generation"`
	Changes    uint8   `json:"changes"`
	Seconds    float64 `json:"seconds"`
}

func backupCmd(g *globalFlags) *cobra.Command {
	var device, output, since, storagePath, limit string
	cmd := &cobra.Command{
		Use:   "backup --device DEV --output DIR [--since MANIFEST] [--storage PATH --limit SIZE]",
		Short: "Back up a device: the whole image, or with --since only what changed since that backup",
		Long: `Copy the snapshot image of DEV into DIR (a new directory: DIR/data, sparse,
and DIR/manifest.json). If DEV is in a taken snapshot, its image is copied;
otherwise a snapshot is taken for the backup (difference storage in --storage,
by default DIR, up to --limit, by default 1/4 of the device) and destroyed
after it. With --since, only the tracking blocks changed since the backup that
MANIFEST describes are copied; when change tracking cannot say (a new
generation, another block size), a full backup is made and the reason printed.`,
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "device", "output"); err != nil {
				return err
			}
			dir, err := absPath("output", output)
			if err != nil {
				return err
			}
			var limitBytes uint64
			if limit != "" {
				if limitBytes, err = parseSize("limit", limit); err != nil {
					return err
				}
			}
			if storagePath == "" {
				storagePath = dir
			}
			if storagePath, err = absPath("storage", storagePath); err != nil {
				return err
			}
			var prev *backup.Manifest
			if since != "" {
				if prev, err = backup.Load(since); err != nil {
					return fmt.Errorf("backup --since: %w", err)
				}
			}
			b := backupRun{g: g, cmd: cmd, device: device, dir: dir, prev: prev, storage: storagePath, limit: limitBytes}
			res, err := b.run(cmd.Context())
			if err != nil {
				return fmt.Errorf("backup of %s: %w", device, err)
			}
			return printResult(cmd, g.json, res, func(w io.Writer) {
				kind := "full"
				if !res.Full {
					kind = "incremental"
				} else if res.Reason != "" {
					kind = "full (" + res.Reason + ")"
				}
				fmt.Fprintf(w, "%s backup of %s: %s of %s copied in %.1fs; manifest %s\n",
					kind, device, bytesText(uint64(res.Bytes)), bytesText(uint64(res.DeviceSize)), res.Seconds, res.Manifest)
			})
		},
	}
	cmd.Flags().StringVar(&device, "device", "", "filtered device, e.g. /dev/ublkb0 (required)")
	cmd.Flags().StringVarP(&output, "output", "o", "", "new directory for the backup (required)")
	cmd.Flags().StringVar(&since, "since", "", "manifest of the previous backup: copy only what changed since")
	cmd.Flags().StringVar(&storagePath, "storage", "", "difference storage of the backup's snapshot (default the output directory)")
	cmd.Flags().StringVar(&limit, "limit", "", "most space that storage may take (default 1/4 of the device)")
	return cmd
}

// backupRun is one backup command.
type backupRun struct {
	g       *globalFlags
	cmd     *cobra.Command
	device  string
	dir     string
	prev    *backup.Manifest // --since, or nil
	storage string
	limit   uint64 // 0: a quarter of the device
}

func (b *backupRun) run(ctx context.Context) (_ backupResult, err error) {
	start := time.Now()
	if _, serr := os.Stat(b.dir); errors.Is(serr, os.ErrNotExist) {
		defer func() {
			if err != nil {
				os.Remove(b.dir) // only if still empty
			}
		}()
	}
	c := b.g.client()
	dev, err := findDevice(ctx, c, b.device)
	if err != nil {
		return backupResult{}, err
	}
	if b.prev != nil && b.prev.Device != dev.Name {
		return backupResult{}, fmt.Errorf("%s is a backup of device %s, not of %s (%s)", b.prev.Path(), b.prev.Device, dev.Path, dev.Name)
	}
	if _, err := os.Stat(filepath.Join(b.dir, backup.ManifestName)); err == nil {
		return backupResult{}, fmt.Errorf("%s already holds a backup; choose a new directory", b.dir)
	}
	image, release, err := b.snapshotImage(ctx, c, dev)
	if err != nil {
		return backupResult{}, err
	}
	defer func() {
		if rerr := release(); rerr != nil {
			fmt.Fprintf(b.cmd.ErrOrStderr(), "ublksnap: %v\n", rerr)
		}
	}()
	m, err := c.CBTMap(ctx, dev.Path)
	if err != nil {
		return backupResult{}, err
	}
	info, err := cbtInfoOf(m)
	if err != nil {
		return backupResult{}, err
	}
	plan, err := backup.PlanFrom(b.prev, m.Map, info)
	if err != nil {
		return backupResult{}, err
	}
	var total int64
	for _, r := range plan.Ranges {
		total += r.Length
	}
	src, err := os.Open(image)
	if err != nil {
		return backupResult{}, err
	}
	defer src.Close()
	p := newProgress(b.cmd.OutOrStdout(), b.cmd.ErrOrStderr(), b.g.json, "backup", total)
	man, err := backup.Write(ctx, src, backup.Options{Dir: b.dir, Device: dev.Name, DeviceSize: int64(dev.Size),
		BlockSize: m.BlockSize, Generation: m.Generation, Changes: m.Changes, Previous: plan.Previous, Ranges: plan.Ranges, Progress: p.Set})
	p.Finish()
	if err != nil {
		return backupResult{}, err
	}
	return backupResult{Manifest: man.Path(), Full: man.Full, Reason: plan.Reason, Bytes: man.Bytes(), DeviceSize: man.DeviceSize,
		Generation: man.Generation, Changes: man.Changes, Seconds: time.Since(start).Seconds()}, nil
}

// snapshotImage returns the image of dev: that of the taken snapshot it is
// in, or of a snapshot taken now, which release destroys.
func (b *backupRun) snapshotImage(ctx context.Context, c *api.Client, dev api.Device) (image string, release func() error, err error) {
	none := func() error { return nil }
	if dev.Snapshot != "" {
		s, err := c.Snapshot(ctx, dev.Snapshot)
		if err != nil {
			return "", nil, err
		}
		for _, m := range s.Devices {
			if m.Device == dev.Path && m.Image != "" {
				return m.Image, none, nil
			}
		}
		return "", nil, fmt.Errorf("%s is in snapshot %s, which is %s, not taken; take or destroy it first", dev.Path, s.ID, s.State)
	}
	limit := b.limit
	if limit == 0 {
		limit = max(dev.Size/4, 64<<20)
	}
	if err := os.MkdirAll(b.dir, 0o755); err != nil {
		return "", nil, err
	}
	s, err := c.CreateSnapshot(ctx, api.CreateSnapshotRequest{Devices: []string{dev.Path}, Storage: b.storage, Limit: limit})
	if err != nil {
		return "", nil, fmt.Errorf("create its snapshot: %w", err)
	}
	release = func() error {
		// Not the command's context: an interrupted backup still releases.
		if err := c.Destroy(context.WithoutCancel(ctx), s.ID, false); err != nil {
			return fmt.Errorf("destroy the backup's snapshot %s: %w", s.ID, err)
		}
		return nil
	}
	if s, err = c.Take(ctx, s.ID); err != nil {
		return "", nil, errors.Join(fmt.Errorf("take its snapshot: %w", err), release())
	}
	for _, m := range s.Devices {
		if m.Image != "" {
			return m.Image, release, nil
		}
	}
	return "", nil, errors.Join(errors.New("its snapshot has no image"), release())
}

// findDevice returns the filtered device named by ref (node or name).
func findDevice(ctx context.Context, c *api.Client, ref string) (api.Device, error) {
	st, err := c.Status(ctx)
	if err != nil {
		return api.Device{}, err
	}
	for _, d := range st.Devices {
		if d.Path == ref || d.Name == ref {
			return d, nil
		}
	}
	return api.Device{}, fmt.Errorf("unknown device %s (see ublksnap status)", ref)
}

// printResult prints a long command's result: one JSON line with --json
// (after the progress lines), else text.
func printResult(cmd *cobra.Command, asJSON bool, v any, text func(w io.Writer)) error {
	if asJSON {
		return json.NewEncoder(cmd.OutOrStdout()).Encode(v)
	}
	text(cmd.OutOrStdout())
	return nil
}
