package main

import (
	"bufio"
	"io"
	"os"
	"strings"
	"testing"
)

// TestSystemdUnit checks the settings restarts depend on, and that the
// unit's command line is one this CLI accepts.
func TestSystemdUnit(t *testing.T) {
	f, err := os.Open("systemd/ublksnap.service")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	keys := map[string]string{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if k, v, ok := strings.Cut(line, "="); ok && !strings.HasPrefix(line, "#") {
			keys[k] = v
		}
	}
	for k, want := range map[string]string{
		"Restart":                  "always", // a crash is recovered by the next daemon
		"KillMode":                 "mixed",  // SIGTERM to the main process, which passes it on
		"RuntimeDirectory":         "ublksnap",
		"RuntimeDirectoryPreserve": "yes", // the state file must outlive the process
		"OOMScoreAdjust":           "-1000",
		"Type":                     "notify", // ready once the declared devices are attached
		"NotifyAccess":             "all",    // the daemon is a child of the main process
		"Before":                   "local-fs-pre.target shutdown.target",
	} {
		if keys[k] != want {
			t.Errorf("%s=%q, want %q", k, keys[k], want)
		}
	}
	args := strings.Fields(keys["ExecStart"])
	if len(args) < 2 || !strings.HasSuffix(args[0], "/ublksnap") || args[1] != "daemon" {
		t.Fatalf("ExecStart=%q does not run ublksnap daemon", keys["ExecStart"])
	}
	cmd := newRootCmd(io.Discard, io.Discard)
	sub, rest, err := cmd.Find(args[1:])
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.ParseFlags(rest); err != nil {
		t.Errorf("ExecStart flags: %v", err)
	}
}
