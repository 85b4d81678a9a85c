package main

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"runtime/debug"
	"strings"
	"sync"
	"testing"

	"github.com/ublksnap/ublksnap/cmd/ublksnap/internal/api"
	"github.com/ublksnap/ublksnap/cow"
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

func TestClientUsageAndFailureCodes(t *testing.T) {
	sock := "--socket=" + t.TempDir() + "/none.sock"
	id := "0b0c3f53-5a47-4a50-8e0e-3e6bd0e3bd1a"
	for _, tc := range []struct {
		args     []string
		code     int
		inStderr string
	}{
		{[]string{"attach"}, 2, "needs --backing"},
		{[]string{"snapshot", "create", "--storage", "/tmp/x"}, 2, "needs --limit"},
		{[]string{"snapshot", "create", "--storage", "/tmp/x", "--limit", "lots"}, 2, `--limit "lots" is not a size`},
		{[]string{"snapshot", "take", "--id", "not-a-uuid"}, 2, "is not a snapshot UUID"},
		{[]string{"snapshot", "take"}, 2, "needs --id"},
		{[]string{"snapshot", "append-storage", "--id", id, "--storage", "/x", "--ranges", "10"}, 2, "is not START:COUNT"},
		{[]string{"snapshot", "append-storage", "--id", id, "--storage", "/x", "--ranges", "10:0"}, 2, "is not START:COUNT"},
		{[]string{"snapshot", "wait-event", "--id", id, "--timeout", "soon"}, 2, "is not a duration"},
		{[]string{"snapshot", "watch", "--id", id, "--grow-dir", "/tmp"}, 2, "needs --grow-limit"},
		{[]string{"snapshot", "watch", "--id", id, "--grow-limit", "1GiB"}, 2, "needs --grow-dir"},
		{[]string{"snapshot", "watch", "--id", id, "--grow-dir", "", "--grow-limit", "1GiB"}, 2, "--grow-dir must not be empty"},
		{[]string{"snapshot", "watch", "--id", id, "--grow-dir", "/proc/version", "--grow-limit", "1GiB", sock}, 1, "is not a directory"},
		{[]string{"snapshot", "watch", "--id", id, "--grow-dir", "/no/such/dir", "--grow-limit", "1GiB", sock}, 1, "no such file"},
		{[]string{"snapshot", "frobnicate"}, 2, "unknown command"},
		{[]string{"status", sock}, 1, "no ublksnap daemon is running"},
		{[]string{"snapshot", "take", "--id", id, sock}, 1, "no ublksnap daemon is running"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), tc.args, &stdout, &stderr)
		if code != tc.code || !strings.Contains(stderr.String(), tc.inStderr) {
			t.Errorf("ublksnap %q: exit %d, stderr %q; want exit %d and %q", tc.args, code, stderr.String(), tc.code, tc.inStderr)
		}
	}
}

func TestParsers(t *testing.T) {
	if n, err := parseSize("limit", "4GiB"); err != nil || n != 4<<30 {
		t.Errorf("parseSize(4GiB) = %d, %v", n, err)
	}
	if d, err := parseTimeout("1500"); err != nil || d.Milliseconds() != 1500 {
		t.Errorf("parseTimeout(1500) = %v, %v; want 1.5s (milliseconds)", d, err)
	}
	if d, err := parseTimeout("2s"); err != nil || d.Milliseconds() != 2000 {
		t.Errorf("parseTimeout(2s) = %v, %v", d, err)
	}
	r, err := parseRanges([]string{"0:8,16:8", "100:1"})
	if err != nil || len(r) != 3 || r[1].Start != 16 || r[2].Count != 1 {
		t.Errorf("parseRanges = %+v, %v", r, err)
	}
}

// The daemon's blksnap parameters take human sizes and show the real
// defaults.
func TestDaemonParameterFlags(t *testing.T) {
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"daemon", "--help"}, &stdout, &stderr); code != 0 {
		t.Fatalf("daemon --help: exit %d", code)
	}
	for _, want := range []string{"--diff-storage-minimum size", "(default 1.0 GiB)", "--chunk-minimum-shift int", "(default 18)", "(default 64 MiB)"} {
		if !strings.Contains(stdout.String(), want) {
			t.Errorf("daemon --help lacks %q:\n%s", want, stdout.String())
		}
	}
	for _, bad := range [][]string{
		{"--diff-storage-minimum", "lots"},
		{"--diff-storage-minimum", "1000"}, // not whole sectors
		{"--chunk-minimum-shift", "1.5"},
		{"--chunk-minimum-shift", "-3"},
		{"--diff-buffer-memory-limit", "16EiB"},
		{"--diff-storage-minimum", "128KiB"}, // a size, but less than two chunks
		{"--chunk-maximum-shift", "31"},      // a number, but out of range
	} {
		stderr.Reset()
		code := run(context.Background(), append([]string{"daemon"}, bad...), &stdout, &stderr)
		if code != 2 || !strings.Contains(stderr.String(), bad[0]) {
			t.Errorf("daemon %q: exit %d, %q; want 2 naming the flag", bad, code, stderr.String())
		}
	}
	p := cow.DefaultParams()
	f := paramFlag{&p, "diff_storage_minimum"}
	if err := f.Set("64MiB"); err != nil || p.DiffStorageMinimum != 64<<11 {
		t.Errorf("64MiB: %v, %d sectors", err, p.DiffStorageMinimum)
	}
	if err := (paramFlag{&p, "diff_buffer_memory_limit"}).Set("32MiB"); err != nil || p.DiffBufferMemoryLimit != 32<<20 {
		t.Errorf("32MiB: %v, %d bytes", err, p.DiffBufferMemoryLimit)
	}
}

// --memory-limit takes a size, defaults to the chunk buffer limit plus
// 64 MiB, may not be below the chunk buffer limit, and gives way to
// GOMEMLIMIT.
func TestDaemonMemoryLimit(t *testing.T) {
	p := cow.DefaultParams() // 64 MiB of chunk buffers
	for _, tc := range []struct {
		flag, env string
		want      int64
	}{
		{"", "", 128 << 20},
		{"192MiB", "", 192 << 20},
		{"64MiB", "", 64 << 20},
		{"", "1GiB", 128 << 20},
		{"201326592", "1GiB", 192 << 20},
	} {
		m, err := daemonMemoryLimit(tc.flag, p, tc.env)
		if err != nil || m.bytes != tc.want || m.gomemlimit != tc.env {
			t.Errorf("daemonMemoryLimit(%q, GOMEMLIMIT=%q) = %+v, %v; want %d bytes", tc.flag, tc.env, m, err, tc.want)
		}
	}
	for _, bad := range [][]string{
		{"--memory-limit", "lots"},
		{"--memory-limit", "32MiB"},
		{"--memory-limit", "63MiB"},
		{"--memory-limit", "100MiB", "--diff-buffer-memory-limit", "128MiB"},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), append([]string{"daemon"}, bad...), &stdout, &stderr)
		if code != 2 || !strings.Contains(stderr.String(), "--memory-limit") {
			t.Errorf("daemon %q: exit %d, %q; want 2 naming --memory-limit", bad, code, stderr.String())
		}
	}
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"daemon", "--help"}, &stdout, &stderr); code != 0 || !strings.Contains(stdout.String(), "--memory-limit string") {
		t.Errorf("daemon --help: exit %d, lacks --memory-limit:\n%s", code, stdout.String())
	}

	// apply sets the runtime's limit, unless GOMEMLIMIT is set.
	was := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(was) })
	quiet := slog.New(slog.DiscardHandler)
	memoryLimit{bytes: 3 << 30, gomemlimit: "1GiB"}.apply(quiet)
	if got := debug.SetMemoryLimit(-1); got != was {
		t.Errorf("apply with GOMEMLIMIT set changed the limit to %d", got)
	}
	memoryLimit{bytes: 3 << 30}.apply(quiet)
	if got := debug.SetMemoryLimit(-1); got != 3<<30 {
		t.Errorf("apply set the limit to %d, want %d", got, int64(3<<30))
	}
}

// request is what a fake daemon saw of one request.
type request struct {
	method, path string
	query        url.Values
	body         []byte
}

// fakeSocket serves every request with 200 and {} on a unix socket. It
// returns the socket flag and a function that returns the requests seen
// since its last call.
func fakeSocket(t *testing.T) (string, func() []request) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "d.sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var seen []request
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		seen = append(seen, request{r.Method, r.URL.Path, r.URL.Query(), body})
		mu.Unlock()
		io.WriteString(w, "{}")
	})}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	return "--socket=" + sock, func() []request {
		mu.Lock()
		defer mu.Unlock()
		out := seen
		seen = nil
		return out
	}
}

// The CLI passes --force on, and sends every path flag absolute: the
// daemon does not share the caller's working directory.
func TestRequestsCarryFlags(t *testing.T) {
	sock, requests := fakeSocket(t)
	cwd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	id := "0b0c3f53-5a47-4a50-8e0e-3e6bd0e3bd1a"
	for _, tc := range []struct {
		args  []string
		check func(r request) bool
	}{
		{[]string{"detach", "--device", "/dev/ublkb0", "--force"}, func(r request) bool {
			return r.method == http.MethodDelete && r.query.Get("force") == "true"
		}},
		{[]string{"detach", "--device", "/dev/ublkb0"}, func(r request) bool { return r.query.Get("force") == "false" }},
		{[]string{"snapshot", "create", "--storage", "diff.img", "--limit", "1GiB", "--force"}, func(r request) bool {
			var req api.CreateSnapshotRequest
			return json.Unmarshal(r.body, &req) == nil && req.Force && req.Storage == filepath.Join(cwd, "diff.img") && req.Limit == 1<<30
		}},
		{[]string{"snapshot", "create", "--storage", "diff.img", "--limit", "1GiB"}, func(r request) bool {
			var req api.CreateSnapshotRequest
			return json.Unmarshal(r.body, &req) == nil && !req.Force
		}},
		{[]string{"snapshot", "append-storage", "--id", id, "--storage", "../more.img"}, func(r request) bool {
			var req api.AppendStorageRequest
			return json.Unmarshal(r.body, &req) == nil && req.Path == filepath.Join(filepath.Dir(cwd), "more.img")
		}},
		{[]string{"attach", "--backing", "disk.img"}, func(r request) bool {
			var req api.AttachRequest
			return json.Unmarshal(r.body, &req) == nil && req.Backing == filepath.Join(cwd, "disk.img")
		}},
	} {
		var stdout, stderr bytes.Buffer
		code := run(context.Background(), append(tc.args, sock), &stdout, &stderr)
		if sent := requests(); code != 0 || len(sent) != 1 || !tc.check(sent[0]) {
			t.Errorf("ublksnap %q: exit %d (%s), sent %+v", tc.args, code, stderr.String(), sent)
		}
	}
}
