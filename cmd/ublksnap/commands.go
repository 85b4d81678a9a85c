package main

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
)

// addCommands adds the client subcommands and their shared flags to root.
func addCommands(root *cobra.Command) {
	g := &globalFlags{}
	root.PersistentFlags().StringVar(&g.socket, "socket", "", "daemon socket (default $"+api.SocketEnv+" or "+api.DefaultSocket+")")
	root.PersistentFlags().BoolVar(&g.json, "json", false, "print JSON for scripts")
	snap := &cobra.Command{
		Use:   "snapshot",
		Short: "Create, take, watch and destroy snapshots",
		Args:  noArgs, // an unknown subcommand is a usage error, not help
		RunE:  func(cmd *cobra.Command, _ []string) error { return cmd.Help() },
	}
	snap.AddCommand(snapshotCreateCmd(g), snapshotAddCmd(g), snapshotAppendStorageCmd(g), snapshotTakeCmd(g),
		snapshotWaitEventCmd(g), snapshotWatchCmd(g), snapshotCollectCmd(g), snapshotInfoCmd(g), snapshotDestroyCmd(g))
	root.AddCommand(attachCmd(g), detachCmd(g), snap, statusCmd(g), daemonCmd(g), newDevCmd())
}

func attachCmd(g *globalFlags) *cobra.Command {
	var req api.AttachRequest
	cmd := &cobra.Command{
		Use:   "attach --backing PATH [--name NAME] [--queues N] [--depth N]",
		Short: "Present a backing file or disk as a filtered device /dev/ublkbN",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "backing"); err != nil {
				return err
			}
			var err error
			if req.Backing, err = absPath("backing", req.Backing); err != nil {
				return err
			}
			if req.Queues < 0 || req.Depth < 0 {
				return usagef("--queues and --depth must be positive")
			}
			dev, err := g.client().Attach(cmd.Context(), req)
			if err != nil {
				return fmt.Errorf("attach %s: %w", req.Backing, err)
			}
			return g.output(cmd, dev, func(w io.Writer) error {
				_, err := fmt.Fprintln(w, dev.Path)
				return err
			})
		},
	}
	cmd.Flags().StringVar(&req.Backing, "backing", "", "backing file or block device (required)")
	cmd.Flags().StringVar(&req.Name, "name", "", "a name for the device (default: the backing file's name)")
	cmd.Flags().IntVar(&req.Queues, "queues", 0, "ublk queues (default min(CPUs, 4))")
	cmd.Flags().IntVar(&req.Depth, "depth", 0, "ublk queue depth (default 128)")
	return cmd
}

func detachCmd(g *globalFlags) *cobra.Command {
	var device string
	var force bool
	cmd := &cobra.Command{
		Use:   "detach --device DEV [--force]",
		Short: "Stop a filtered device (it must not be in a snapshot)",
		Long: "Stops the device and flushes its backing. It is refused while the device\n" +
			"is mounted or open (the error names who holds it) unless --force, which\n" +
			"tears the disk out from under its users.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "device"); err != nil {
				return err
			}
			if err := g.client().Detach(cmd.Context(), device, force); err != nil {
				return fmt.Errorf("detach %s: %w", device, err)
			}
			return nil
		},
	}
	cmd.Flags().StringVar(&device, "device", "", "filtered device, e.g. /dev/ublkb0 (required)")
	cmd.Flags().BoolVar(&force, "force", false, "detach even while the device is mounted or open")
	return cmd
}

func snapshotCreateCmd(g *globalFlags) *cobra.Command {
	var devices []string
	var storage, limit string
	var force bool
	cmd := &cobra.Command{
		Use:   "create [--device DEV ...] --storage PATH --limit SIZE [--force]",
		Short: "Create a snapshot and its difference storage; prints its UUID",
		Long: "PATH is a file (grown up to SIZE; one that does not exist is created and\n" +
			"removed with the snapshot), a directory (an unnamed temporary file in it,\n" +
			"gone with the snapshot) or a block device (used up to SIZE). An existing\n" +
			"file that holds data is refused unless --force: it would be overwritten.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "storage", "limit"); err != nil {
				return err
			}
			req := api.CreateSnapshotRequest{Devices: devices, Force: force}
			var err error
			if req.Storage, err = absPath("storage", storage); err != nil {
				return err
			}
			if req.Limit, err = parseSize("limit", limit); err != nil {
				return err
			}
			s, err := g.client().CreateSnapshot(cmd.Context(), req)
			if err != nil {
				return fmt.Errorf("create snapshot: %w", err)
			}
			return g.output(cmd, s, func(w io.Writer) error {
				_, err := fmt.Fprintln(w, s.ID)
				return err
			})
		},
	}
	cmd.Flags().StringArrayVar(&devices, "device", nil, "filtered device to include (repeatable)")
	cmd.Flags().StringVar(&storage, "storage", "", "difference storage: file, directory or block device (required)")
	cmd.Flags().StringVar(&limit, "limit", "", "most space the difference storage may take, e.g. 4GiB (required)")
	cmd.Flags().BoolVar(&force, "force", false, "use an existing file that holds data as the storage, overwriting it")
	return cmd
}

// idCmd builds a command that needs --id UUID and calls run with it.
func idCmd(use, short string, run func(cmd *cobra.Command, id string) error) *cobra.Command {
	var id string
	cmd := &cobra.Command{
		Use:   use,
		Short: short,
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "id"); err != nil {
				return err
			}
			id, err := parseID(id)
			if err != nil {
				return err
			}
			return run(cmd, id)
		},
	}
	cmd.Flags().StringVar(&id, "id", "", "snapshot UUID (required)")
	return cmd
}

// printSnapshot prints a snapshot's members and images.
func (g *globalFlags) printSnapshot(cmd *cobra.Command, s api.Snapshot) error {
	return g.output(cmd, s, func(w io.Writer) error {
		for _, m := range s.Devices {
			if m.Image != "" {
				fmt.Fprintf(w, "%s %s\n", m.Device, m.Image)
			} else {
				fmt.Fprintln(w, m.Device)
			}
		}
		return nil
	})
}

func snapshotAddCmd(g *globalFlags) *cobra.Command {
	var device string
	cmd := idCmd("add --id UUID --device DEV", "Add a filtered device to a snapshot not yet taken",
		func(cmd *cobra.Command, id string) error {
			if err := required(cmd, "device"); err != nil {
				return err
			}
			s, err := g.client().AddDevice(cmd.Context(), id, device)
			if err != nil {
				return fmt.Errorf("add %s to snapshot %s: %w", device, id, err)
			}
			return g.printSnapshot(cmd, s)
		})
	cmd.Flags().StringVar(&device, "device", "", "filtered device, e.g. /dev/ublkb0 (required)")
	return cmd
}

func snapshotAppendStorageCmd(g *globalFlags) *cobra.Command {
	var storage string
	var ranges []string
	cmd := idCmd("append-storage --id UUID --storage PATH [--ranges START:COUNT ...]",
		"Add a file or block device (or sector ranges of it) to a snapshot's difference storage",
		func(cmd *cobra.Command, id string) error {
			if err := required(cmd, "storage"); err != nil {
				return err
			}
			req := api.AppendStorageRequest{}
			var err error
			if req.Path, err = absPath("storage", storage); err != nil {
				return err
			}
			if req.Ranges, err = parseRanges(ranges); err != nil {
				return err
			}
			s, err := g.client().AppendStorage(cmd.Context(), id, req)
			if err != nil {
				return fmt.Errorf("append %s to snapshot %s: %w", req.Path, id, err)
			}
			return g.output(cmd, s, func(w io.Writer) error {
				_, err := fmt.Fprintf(w, "storage %s of %s, %s used\n", bytesText(s.Storage.Capacity),
					bytesText(s.Storage.Limit), bytesText(s.Storage.Used))
				return err
			})
		})
	cmd.Flags().StringVar(&storage, "storage", "", "file or block device to add (required)")
	cmd.Flags().StringArrayVar(&ranges, "ranges", nil, "sector ranges START:COUNT (default: all of it)")
	return cmd
}

func snapshotTakeCmd(g *globalFlags) *cobra.Command {
	return idCmd("take --id UUID", "Take the snapshot; prints each member device and its image",
		func(cmd *cobra.Command, id string) error {
			s, err := g.client().Take(cmd.Context(), id)
			if err != nil {
				return fmt.Errorf("take snapshot %s: %w", id, err)
			}
			return g.printSnapshot(cmd, s)
		})
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

func snapshotWaitEventCmd(g *globalFlags) *cobra.Command {
	var timeout string
	cmd := idCmd("wait-event --id UUID [--timeout DURATION]", "Wait for the snapshot's next event",
		func(cmd *cobra.Command, id string) error {
			d, err := parseTimeout(timeout)
			if err != nil {
				return err
			}
			e, err := g.client().WaitEvent(cmd.Context(), id, d.Milliseconds())
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

func snapshotCollectCmd(g *globalFlags) *cobra.Command {
	return &cobra.Command{
		Use:   "collect",
		Short: "List the snapshot UUIDs",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ids, err := g.client().Snapshots(cmd.Context())
			if err != nil {
				return fmt.Errorf("collect snapshots: %w", err)
			}
			return g.output(cmd, ids, func(w io.Writer) error {
				for _, id := range ids {
					fmt.Fprintln(w, id)
				}
				return nil
			})
		},
	}
}

func snapshotInfoCmd(g *globalFlags) *cobra.Command {
	var device string
	cmd := &cobra.Command{
		Use:   "info --device DEV",
		Short: "Show the snapshot state, image and error code of a filtered device",
		Args:  noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := required(cmd, "device"); err != nil {
				return err
			}
			i, err := g.client().SnapshotInfo(cmd.Context(), device)
			if err != nil {
				return fmt.Errorf("snapshot info of %s: %w", device, err)
			}
			return g.output(cmd, i, func(w io.Writer) error {
				_, err := fmt.Fprintf(w, "snapshot=%s\nstate=%s\nimage=%s\nerror_code=%d\n", i.Snapshot, i.State, i.Image, i.ErrorCode)
				return err
			})
		},
	}
	cmd.Flags().StringVar(&device, "device", "", "filtered device, e.g. /dev/ublkb0 (required)")
	return cmd
}

func snapshotDestroyCmd(g *globalFlags) *cobra.Command {
	var force bool
	cmd := idCmd("destroy --id UUID [--force]", "Remove the snapshot's images and release its storage",
		func(cmd *cobra.Command, id string) error {
			if err := g.client().Destroy(cmd.Context(), id, force); err != nil {
				return fmt.Errorf("destroy snapshot %s: %w", id, err)
			}
			return nil
		})
	cmd.Flags().BoolVar(&force, "force", false, "destroy even while an image is open or mounted")
	return cmd
}

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
	fmt.Fprintf(tw, "DEVICE\tNAME\tSIZE\tBACKING\tSNAPSHOT\n")
	for _, d := range s.Devices {
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", d.Path, d.Name, bytesText(d.Size), d.Backing, orDash(d.Snapshot))
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
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\n", id, state, storage, m.Device, orDash(m.Image),
				bytesText(m.ChunkSize), m.ChunksCopied, m.ErrorCode)
		}
	}
	return tw.Flush()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
