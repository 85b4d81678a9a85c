package daemon

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/ublksnap/ublksnap/cow"
	"github.com/ublksnap/ublksnap/export"
	"github.com/ublksnap/ublksnap/host"
	"github.com/ublksnap/ublksnap/internal/devconf"
	"github.com/ublksnap/ublksnap/snapshot"
	"github.com/ublksnap/ublksnap/ublk"
)

// shutdownTimeout bounds how long the end of a run waits for the requests
// in flight.
const shutdownTimeout = 5 * time.Second

// Config configures one run of the daemon (Run).
type Config struct {
	// Socket is the unix socket the daemon serves the api protocol on.
	// Its state file (snapshot.StatePathFor) and the exports it saves for
	// the next daemon (snapshot.BesideSocket) are kept beside it.
	Socket string
	// Params are blksnap's parameters for new snapshots.
	Params cow.Params
	// IOMode is the I/O mode of filtered devices attached without one of
	// their own (snapshot.Config.IOMode).
	IOMode ublk.IOMode
	// Logger receives the daemon's log; nil: slog.Default().
	Logger *slog.Logger
	// Version is the daemon's version, as status reports it.
	Version string
	// FreezeHolder is the command of the freeze holder process the real
	// Host runs to freeze filesystems (host.System.FreezeHolder);
	// unused when Host is set.
	FreezeHolder []string
	// DevicesFile declares the filtered devices to attach at the start
	// (internal/devconf); "" or a missing file declares none.
	DevicesFile string
	// Server presents the filtered devices and images; nil: ublk. Host
	// tests pass a fake.
	Server snapshot.BlockServer
	// Host freezes filesystems and finds who holds a device; nil: the
	// running system, freezing through FreezeHolder. Host tests pass a
	// fake.
	Host snapshot.Host
}

// Run is the daemon's life on cfg.Socket. It listens on the socket (an
// error wrapping ErrRunning if another daemon does), serves again the
// filtered devices and snapshots an earlier daemon left (see
// snapshot.Manager.Recover) and the exports it saved, then serves the api
// protocol until one of two ends:
//
//   - ctx ends (SIGTERM or SIGINT: a restart): the running exports are
//     saved beside the socket and the filtered devices left, with their
//     taken snapshots, to the next daemon on the same socket
//     (snapshot.Manager.Leave);
//   - a shutdown request is accepted (`ublksnap shutdown`: a stop for
//     good): the exports end, then the images and the filtered devices
//     (snapshot.Manager.Close), and the state file records none.
//
// Either way the server stops first and Run returns nil once done. It
// returns an error when it cannot listen, recover, serve, leave or stop.
//
// Run does nothing to the process beyond its socket and files; the caller
// prepares the process it runs in (ReexecInPrivateNamespace,
// HardenProcess, DropUblkMounts).
func Run(ctx context.Context, cfg Config) error {
	log := cmp.Or(cfg.Logger, slog.Default())
	l, err := Listen(cfg.Socket)
	if err != nil {
		return err
	}
	defer l.Close()
	mgr, err := snapshot.New(snapshot.Config{Params: cfg.Params, Logger: log, StatePath: snapshot.StatePathFor(cfg.Socket),
		IOMode: cfg.IOMode, Server: cmp.Or[snapshot.BlockServer](cfg.Server, host.UblkServer{}),
		Host: cmp.Or[snapshot.Host](cfg.Host, host.System{FreezeHolder: cfg.FreezeHolder})})
	if err != nil {
		return fmt.Errorf("start the daemon on %s: %w", cfg.Socket, err)
	}
	rep, err := mgr.Recover(ctx)
	if err != nil {
		return fmt.Errorf("recover the devices of an earlier daemon: %w", err)
	}
	logRecovery(log, rep)
	exports := export.New(log)
	exportsPath := snapshot.BesideSocket(cfg.Socket, "exports")
	if saved, err := export.TakeSaved(exportsPath); err != nil {
		log.Error("exports of the earlier daemon not started again", "err", err)
	} else {
		ResumeExports(mgr, exports, saved, log)
	}
	attachDeclared(ctx, mgr, cfg.DevicesFile, log)
	srv := NewServer(ctx, mgr, exports, cfg.Version, log) // SIGTERM ends waits
	served := make(chan error, 1)
	// The server closes the socket at its shutdown; the lock stays until
	// Run returns, so no next daemon starts while this one leaves.
	go func() { served <- srv.Serve(l.Listener) }()
	log.Info("daemon listening", "socket", cfg.Socket, "pid", os.Getpid())
	if err := notifySystemd("READY=1"); err != nil {
		log.Warn("systemd not told the daemon is ready", "err", err)
	}
	forGood := false
	select {
	case <-ctx.Done():
	case <-mgr.ShutdownRequested():
		forGood = true
	case err := <-served:
		return fmt.Errorf("serve %s: %w", cfg.Socket, err)
	}
	notifySystemd("STOPPING=1")
	sctx, cancel := context.WithTimeout(context.Background(), shutdownTimeout)
	defer cancel()
	srv.Shutdown(sctx)
	saved := exports.Saved()
	exports.Close()
	if forGood {
		return stopForGood(mgr, log)
	}
	return leave(mgr, saved, exportsPath, log)
}

// attachDeclared attaches the devices the devices file declares, before
// the daemon answers its first request (and before systemd hears it is
// ready, so that fstab's mounts of them follow). A line that does not
// parse or a device that cannot be attached is logged and reported in
// status; the others come up all the same.
func attachDeclared(ctx context.Context, mgr *snapshot.Manager, path string, log *slog.Logger) {
	if path == "" {
		return
	}
	devs, errs := devconf.Load(path)
	var decls []snapshot.Declared
	for _, err := range errs {
		source := path
		var le *devconf.LineError
		if errors.As(err, &le) {
			source, err = fmt.Sprintf("%s:%d", le.Path, le.Line), le.Err
		}
		decls = append(decls, snapshot.Declared{Source: source, Err: err})
	}
	for _, d := range devs {
		decls = append(decls, snapshot.Declared{Source: fmt.Sprintf("%s:%d", path, d.Line),
			Options: snapshot.AttachOptions{Name: d.Name, Backing: d.Backing, Queues: d.Queues, Depth: d.Depth, IOMode: d.IOMode}})
	}
	for _, d := range mgr.AttachDeclared(ctx, decls) {
		if d.Err != nil {
			log.Error("declared device not attached", "source", d.Source, "name", d.Options.Name, "backing", d.Options.Backing, "err", d.Err)
		} else {
			log.Info("declared device attached", "source", d.Source, "name", d.Options.Name, "device", d.Device)
		}
	}
}

// leave ends a run for a restart (SIGTERM or SIGINT): the filtered
// devices stay and wait for the next daemon, the process exits with them
// served, and the snapshots Leave keeps come back with their exports,
// saved to exportsPath.
func leave(mgr *snapshot.Manager, saved []export.Saved, exportsPath string, log *slog.Logger) error {
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

// stopForGood ends a run after an accepted shutdown request: the images,
// then the filtered devices stop.
func stopForGood(mgr *snapshot.Manager, log *slog.Logger) error {
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
