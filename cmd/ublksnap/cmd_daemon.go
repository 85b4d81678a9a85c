package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/daemon"
	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/export"
	"github.com/ublksnap/ublksnap/host"
	"github.com/ublksnap/ublksnap/snapshot"
	"github.com/ublksnap/ublksnap/ublk"
)

// silentExit ends the process with a code whose message was already
// printed (by the re-executed daemon).
type silentExit int

// ioModes describes the values of --io-mode.
const ioModes = "auto (zero copy where the kernel has it, Linux 6.16+, else user copy, 6.5+, else copy), zero-copy, user-copy or copy (fail where the kernel lacks them)"

func (e silentExit) Error() string { return fmt.Sprintf("exit status %d", int(e)) }

func daemonCmd(g *globalFlags) *cobra.Command {
	var verbose bool
	var ioMode, memLimit string
	params := cow.DefaultParams()
	cmd := &cobra.Command{
		Use:   "daemon [--socket PATH] [--PARAMETER VALUE ...]",
		Short: "Run the daemon that owns the devices and snapshots (root)",
		Long: "The daemon serves the CLI on a unix socket, in its own mount namespace.\n" +
			"The parameters are blksnap's, with dashes for underscores (see cow.Params);\n" +
			"sizes take units (64MiB, 1GiB; a bare number is bytes). The chunk buffers of all\n" +
			"snapshots together stay within --diff-buffer-memory-limit, and --memory-limit\n" +
			"makes the Go runtime return freed memory before the daemon grows past it.\n\n" +
			"Its filtered devices outlive it. SIGTERM or SIGINT ends the daemon but leaves\n" +
			"them, their I/O waiting, with the taken snapshots, to the next daemon on the\n" +
			"same socket, which serves them again; after a\n" +
			"crash the same happens, but snapshots are lost. `ublksnap shutdown` stops\n" +
			"everything for good.",
		Args: noArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkParams(cmd, &params); err != nil {
				return err
			}
			mem, err := daemonMemoryLimit(memLimit, params, gomemlimitEnv())
			if err != nil {
				return err
			}
			if os.Geteuid() != 0 {
				return errors.New("the daemon needs root: it creates ublk devices")
			}
			ctx := cmd.Context()
			if !daemon.InPrivateNamespace() {
				code, err := daemon.ReexecInPrivateNamespace(ctx)
				if err != nil {
					return err
				}
				if code != 0 {
					return silentExit(code)
				}
				return nil
			}
			level := slog.LevelInfo
			if verbose {
				level = slog.LevelDebug
			}
			log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: level}))
			mem.apply(log)
			mode, err := ublk.ParseIOMode(ioMode)
			if err != nil {
				return usagef("--io-mode %q: want %s", ioMode, ioModes)
			}
			return serveDaemon(ctx, api.SocketPath(g.socket), params, mode, log)
		},
	}
	for _, name := range cow.ParamNames() {
		cmd.Flags().Var(paramFlag{&params, name}, flagName(name), paramUsage(name))
	}
	cmd.Flags().BoolVarP(&verbose, "verbose", "v", false, "log debug messages")
	cmd.Flags().StringVar(&ioMode, "io-mode", "auto", "how the filtered devices' data moves: "+ioModes)
	cmd.Flags().StringVar(&memLimit, "memory-limit", "", "the Go runtime's soft memory limit, a size such as 192MiB, at least --diff-buffer-memory-limit (default: that + 64 MiB; GOMEMLIMIT, if set, wins)")
	return cmd
}

// serveDaemon serves again the filtered devices an earlier daemon left
// (see snapshot.Manager.Recover) and runs the daemon. When ctx ends
// (SIGTERM) it leaves the filtered devices to the next daemon; after
// `ublksnap shutdown` it stops the images, the filtered devices and the
// server, in that order.
func serveDaemon(ctx context.Context, socket string, params cow.Params, mode ublk.IOMode, log *slog.Logger) error {
	if err := daemon.HardenProcess(); err != nil {
		log.Warn("running without full protection", "err", err)
	}
	if err := daemon.DropUblkMounts(); err != nil {
		return err
	}
	l, err := daemon.Listen(socket)
	if err != nil {
		return err
	}
	defer l.Close()
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("find own executable: %w", err)
	}
	statePath := snapshot.StatePathFor(socket)
	mgr, err := snapshot.New(snapshot.Config{Params: params, Logger: log, StatePath: statePath, IOMode: mode,
		Server: host.UblkServer{}, Host: host.System{FreezeHolder: []string{self, freezeHolderName}}})
	if err != nil {
		return err
	}
	rep, err := mgr.Recover(ctx)
	if err != nil {
		return fmt.Errorf("recover the devices of an earlier daemon: %w", err)
	}
	logRecovery(log, rep)
	exports := export.New(log)
	exportsPath := snapshot.BesideSocket(socket, "exports")
	if saved, err := export.TakeSaved(exportsPath); err != nil {
		log.Error("exports of the earlier daemon not started again", "err", err)
	} else {
		daemon.ResumeExports(mgr, exports, saved, log)
	}
	srv := daemon.NewServer(ctx, mgr, exports, version, log) // SIGTERM ends waits
	served := make(chan error, 1)
	go func() { served <- srv.Serve(l) }()
	log.Info("daemon listening", "socket", socket, "pid", os.Getpid())
	forGood := false
	select {
	case <-ctx.Done():
	case <-mgr.ShutdownRequested():
		forGood = true
	case err := <-served:
		return fmt.Errorf("serve %s: %w", socket, err)
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	srv.Shutdown(sctx)
	saved := exports.Saved()
	exports.Close()
	if !forGood {
		// SIGTERM or SIGINT: a restart. The filtered devices stay and
		// wait for the next daemon; the process exits with them served.
		// The snapshots Leave keeps come back with their exports.
		log.Info("leaving the filtered devices to the next daemon (ublksnap shutdown stops them)")
		if len(saved) > 0 {
			if err := export.WriteSaved(exportsPath, saved); err != nil {
				log.Warn("exports will not be started again after the restart", "err", err)
			}
		}
		if err := mgr.Leave(); err != nil {
			return fmt.Errorf("leave: %w", err)
		}
		log.Info("daemon stopped; devices wait for the next one")
		return nil
	}
	log.Info("stopping for good: images first, then filtered devices")
	if err := mgr.Close(); err != nil {
		return fmt.Errorf("stop: %w", err)
	}
	log.Info("daemon stopped")
	return nil
}

// logRecovery summarises what the start-up recovery did.
func logRecovery(log *slog.Logger, rep snapshot.RecoveryReport) {
	for _, d := range rep.Recovered {
		log.Info("device recovered from an earlier daemon", "device", d.Path, "backing", d.Backing, "took", rep.Took[d.Path])
	}
	for _, f := range rep.Failed {
		log.Error("device of an earlier daemon could not be recovered and was deleted", "ublk", f.UblkID, "name", f.Name, "err", f.Err)
	}
	for _, f := range rep.Left {
		log.Error("device of the state file is served by another process; left alone", "ublk", f.UblkID, "name", f.Name, "err", f.Err)
	}
	if len(rep.Removed) > 0 {
		log.Info("deleted devices an earlier daemon left and no record names (its snapshot images)", "ublk", rep.Removed)
	}
}
