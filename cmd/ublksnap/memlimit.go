package main

import (
	"log/slog"
	"math"
	"os"
	"runtime/debug"

	"github.com/dustin/go-humanize"

	"github.com/ublksnap/ublksnap/cow"
)

// memoryHeadroom is what the daemon's default memory limit leaves above
// the chunk buffers: the Go runtime, the queues' I/O buffers, chunk maps
// and change tracking maps.
const memoryHeadroom = 64 << 20

// memoryLimit is the Go runtime's soft memory limit the daemon runs with
// (runtime/debug.SetMemoryLimit): near it the garbage collector runs more
// often and returns freed heap to the system, so the resident set stays
// near the heap in use instead of its peak.
type memoryLimit struct {
	bytes int64
	// gomemlimit is the GOMEMLIMIT environment variable, if set: the
	// runtime obeys it already and bytes is not applied.
	gomemlimit string
}

// daemonMemoryLimit decides the memory limit from --memory-limit (flag,
// "" when not given: diff_buffer_memory_limit + 64 MiB) and the
// environment variable GOMEMLIMIT (gomemlimit, "" when unset). A limit
// below the chunk buffers' own is a usage error.
func daemonMemoryLimit(flag string, params cow.Params, gomemlimit string) (memoryLimit, error) {
	m := memoryLimit{bytes: params.DiffBufferMemoryLimit + memoryHeadroom, gomemlimit: gomemlimit}
	if flag == "" {
		return m, nil
	}
	n, err := parseSize("memory-limit", flag)
	if err != nil {
		return memoryLimit{}, err
	}
	if n > math.MaxInt64 {
		return memoryLimit{}, usagef("--memory-limit %q is too large", flag)
	}
	if int64(n) < params.DiffBufferMemoryLimit {
		return memoryLimit{}, usagef("--memory-limit %s is below --diff-buffer-memory-limit %s: the chunk buffers alone may take that much",
			humanize.IBytes(n), humanize.IBytes(uint64(params.DiffBufferMemoryLimit)))
	}
	m.bytes = int64(n)
	return m, nil
}

// apply sets the runtime's memory limit, unless GOMEMLIMIT did.
func (m memoryLimit) apply(log *slog.Logger) {
	if m.gomemlimit != "" {
		log.Info("memory limit from GOMEMLIMIT; --memory-limit and its default not applied", "GOMEMLIMIT", m.gomemlimit)
		return
	}
	debug.SetMemoryLimit(m.bytes)
	log.Info("memory limit", "bytes", m.bytes, "size", humanize.IBytes(uint64(m.bytes)))
}

// gomemlimitEnv returns the GOMEMLIMIT environment variable, "" if unset.
func gomemlimitEnv() string { return os.Getenv("GOMEMLIMIT") }
