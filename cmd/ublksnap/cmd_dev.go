package main

import (
	"context"
	"fmt"
	"log/slog"
	"os/signal"
	"syscall"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/snapshot"
	"github.com/ublksnap/ublksnap/storage"
	"github.com/ublksnap/ublksnap/ublk"
)

// devServeOptions are the flags of "ublksnap dev serve".
type devServeOptions struct {
	backing string // backing file or block device
	queues  int    // 0: default
	depth   int    // 0: default
	maxIO   int    // bytes, 0: default
	mmap    bool   // copy through a mapping of the backing file
	pin     bool   // pin queue threads to their CPUs
}

// newDevCmd builds "ublksnap dev", the low-level device commands used until
// the daemon serves devices itself.
func newDevCmd() *cobra.Command {
	dev := &cobra.Command{
		Use:   "dev",
		Short: "Low-level ublk device tools",
		Args:  noArgs,
		RunE:  func(cmd *cobra.Command, args []string) error { return cmd.Help() },
	}
	var o devServeOptions
	serve := &cobra.Command{
		Use:   "serve --backing FILE",
		Short: "Serve a backing file or block device as /dev/ublkbN until interrupted",
		Long: `Serve a backing file or block device as a ublk block device, passing
every request through at the same offset: a filtered device that is in no
snapshot, without the daemon (for benchmarks). The device node is printed on
stdout once the device is ready; SIGINT or SIGTERM stops and deletes it.

EXIT STATUS
  0  the device was served and deleted after a signal
  1  the device could not be created or its teardown failed
  2  the command line was wrong`,
		Args: noArgs,
		PreRunE: func(cmd *cobra.Command, args []string) error {
			if o.backing == "" {
				return usagef("--backing is required")
			}
			if o.queues < 0 || o.depth < 0 || o.maxIO < 0 {
				return usagef("--queues, --depth and --max-io must not be negative")
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), syscall.SIGINT, syscall.SIGTERM)
			defer stop()
			return runDevServe(ctx, cmd, o)
		},
	}
	f := serve.Flags()
	f.StringVar(&o.backing, "backing", "", "backing file or block device (required)")
	f.IntVar(&o.queues, "queues", 0, "number of queues (default min(CPUs, 4))")
	f.IntVar(&o.depth, "depth", 0, "queue depth (default 128)")
	f.IntVar(&o.maxIO, "max-io", 0, "largest request in bytes (default 1 MiB)")
	f.BoolVar(&o.pin, "pin", false, "pin each queue thread to the CPUs its queue serves")
	f.BoolVar(&o.mmap, "mmap", false, "copy data through a shared mapping of the backing file (regular files)")
	dev.AddCommand(serve)
	return dev
}

func runDevServe(ctx context.Context, cmd *cobra.Command, o devServeOptions) error {
	b, err := storage.OpenWith(o.backing, storage.OpenOptions{Mmap: o.mmap, Direct: !o.mmap})
	if err != nil {
		return err
	}
	defer b.Close()
	log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
	cfg := snapshot.DeviceConfig(b, log)
	if o.queues > 0 {
		cfg.Queues = o.queues
	}
	if o.depth > 0 {
		cfg.Depth = o.depth
	}
	if o.maxIO > 0 {
		cfg.MaxIOSize = o.maxIO
	}
	cfg.PinQueues = o.pin
	if err := cfg.Validate(); err != nil {
		return usageError{err}
	}
	d, err := ublk.New(ctx, cfg, snapshot.NewPassthrough(b, log))
	if err != nil {
		return err
	}
	fmt.Fprintln(cmd.OutOrStdout(), d.Path())
	fmt.Fprintf(cmd.ErrOrStderr(), "serving %s (%s) on %s with %d queues of depth %d\n",
		o.backing, humanize.IBytes(uint64(cfg.Size)), d.Path(), d.Queues(), cfg.Depth)
	<-d.Done()
	return d.Err()
}
