package main

import (
	"encoding/json"
	"fmt"
	"io"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/google/uuid"
	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/storage"
)

// globalFlags are the root's persistent flags, shared by every client command.
type globalFlags struct {
	socket string // daemon socket; empty means $UBLKSNAP_SOCKET or api.DefaultSocket
	json   bool   // print machine-readable JSON instead of text
	// devicesFile declares the devices the daemon attaches at its start
	// (internal/devconf); attach and detach --persist edit it.
	devicesFile string
}

func (g *globalFlags) client() *api.Client {
	return api.NewClient(api.SocketPath(g.socket))
}

// output prints v on the command's stdout as JSON when --json is set,
// else calls text.
func (g *globalFlags) output(cmd *cobra.Command, v any, text func(w io.Writer) error) error {
	return writeOutput(cmd.OutOrStdout(), g.json, v, text)
}

// writeOutput prints v to w as indented JSON if asJSON, else calls text.
func writeOutput(w io.Writer, asJSON bool, v any, text func(w io.Writer) error) error {
	if asJSON {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(v)
	}
	return text(w)
}

// required fails with a usage error naming the first of flags not given.
func required(cmd *cobra.Command, flags ...string) error {
	for _, name := range flags {
		if !cmd.Flags().Changed(name) {
			return usagef("%s needs --%s; see %s --help", cmd.CommandPath(), name, cmd.CommandPath())
		}
	}
	return nil
}

// parseID checks that s is a snapshot UUID.
func parseID(s string) (string, error) {
	id, err := uuid.Parse(s)
	if err != nil {
		return "", usagef("--id %q is not a snapshot UUID (like 8c5d3a2e-...; see ublksnap snapshot collect)", s)
	}
	return id.String(), nil
}

// parseSize parses a size such as 4GiB, 512M or 1073741824 into bytes.
func parseSize(flag, s string) (uint64, error) {
	n, err := humanize.ParseBytes(s)
	if err != nil {
		return 0, usagef("--%s %q is not a size (examples: 512MiB, 4GiB, 1073741824)", flag, s)
	}
	return n, nil
}

// parseRanges parses START:COUNT sector ranges.
func parseRanges(specs []string) ([]storage.Range, error) {
	var out []storage.Range
	for _, spec := range specs {
		for _, part := range strings.Split(spec, ",") {
			a, b, ok := strings.Cut(part, ":")
			start, err1 := strconv.ParseUint(a, 10, 63)
			count, err2 := strconv.ParseUint(b, 10, 63)
			if !ok || err1 != nil || err2 != nil || count == 0 {
				return nil, usagef("--ranges %q is not START:COUNT in 512-byte sectors with COUNT > 0", part)
			}
			out = append(out, storage.Range{Start: int64(start), Count: int64(count)})
		}
	}
	return out, nil
}

// parseTimeout accepts a Go duration (1.5s, 200ms) or whole milliseconds.
func parseTimeout(s string) (time.Duration, error) {
	if ms, err := strconv.ParseUint(s, 10, 63); err == nil {
		return time.Duration(ms) * time.Millisecond, nil
	}
	d, err := time.ParseDuration(s)
	if err != nil || d < 0 {
		return 0, usagef("--timeout %q is not a duration (examples: 500ms, 10s, or milliseconds as a number)", s)
	}
	return d, nil
}

// absPath makes a path absolute: the daemon does not share our directory.
func absPath(flag, p string) (string, error) {
	if p == "" {
		return "", usagef("--%s must not be empty", flag)
	}
	a, err := filepath.Abs(p)
	if err != nil {
		return "", fmt.Errorf("--%s %s: %w", flag, p, err)
	}
	return a, nil
}

// bytesText prints a byte count for humans: "1.0 GiB".
func bytesText(n uint64) string { return humanize.IBytes(n) }
