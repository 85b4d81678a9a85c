package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

func TestExitCodes(t *testing.T) {
	for _, tc := range []struct {
		args     []string
		code     int
		inStdout string
		inStderr string
	}{
		{[]string{"version"}, 0, "ublksnap ", ""},
		{[]string{"no-such-command"}, 2, "", `unknown command "no-such-command"`},
		{[]string{"version", "extra"}, 2, "", "takes no arguments"},
		{[]string{"--no-such-flag"}, 2, "", "unknown flag: --no-such-flag"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), tc.args, &stdout, &stderr)
		if code != tc.code {
			t.Errorf("ublksnap %q: exit %d, want %d (stderr %q)", tc.args, code, tc.code, stderr.String())
		}
		if !strings.Contains(stdout.String(), tc.inStdout) {
			t.Errorf("ublksnap %q: stdout %q lacks %q", tc.args, stdout.String(), tc.inStdout)
		}
		if !strings.Contains(stderr.String(), tc.inStderr) {
			t.Errorf("ublksnap %q: stderr %q lacks %q", tc.args, stderr.String(), tc.inStderr)
		}
	}
}
