package main

import (
	"errors"
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/daemon"
	"github.com/ublksnap/ublksnap/cow"
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
			// The process is the daemon's now, in its own mount
			// namespace: these change it, hence here, not in daemon.Run.
			if err := daemon.HardenProcess(); err != nil {
				log.Warn("running without full protection", "err", err)
			}
			if err := daemon.DropUblkMounts(); err != nil {
				return err
			}
			self, err := os.Executable()
			if err != nil {
				return fmt.Errorf("find own executable: %w", err)
			}
			return daemon.Run(ctx, daemon.Config{Socket: api.SocketPath(g.socket), Params: params, IOMode: mode,
				Logger: log, Version: version, FreezeHolder: []string{self, freezeHolderName}, DevicesFile: g.devicesFile})
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
