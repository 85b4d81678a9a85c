// Command report turns one bench/run.sh pass (raw.csv and meta.csv) into
// the results of a kernel line: a Markdown table with medians and
// quartiles and ratios, the same as CSV, a PNG bar chart of the ratios to
// loop, and a check of the targets of bench/README.md.
//
// The model: every cell (row × contender) is the set of its runs, summed up
// by its median and quartiles; a ratio is one of two medians, and a target
// is met only when that ratio of medians meets it. A row measures
// throughput (IOPS or MiB/s, higher is better) or latency (p50 µs, lower is
// better). The targets depend on the kernel line (-name: 7 or 6.12): on 6.12
// the 1 MiB rows without snapshot are held to the two-copy bound measured
// in the same boot rather than to loop, since that kernel has no zero copy.
//
//	go run ./bench/report -in bench/out/6.12 -out bench/results -name 6.12
package main

import (
	"encoding/csv"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"
)

// metric is what a row measures: the column of raw.csv after the run.
type metric int

const (
	iops    metric = iota // raw.csv's iops
	mibs                  // mib_s
	latency               // clat_p50_us: lower is better
)

func (m metric) unit() string { return [...]string{"IOPS", "MiB/s", "µs p50"}[m] }

// row is one workload of bench/run.sh.
type row struct {
	id     string // the name bench/run.sh uses
	title  string // what a reader sees
	metric metric
}

var rows = []row{
	{"first4k", "4 KiB write, one per chunk, QD32 (first writes)", iops},
	{"randw4k", "4 KiB randwrite QD32 (overwrites)", iops},
	{"randw4k4j", "4 KiB randwrite, 4 jobs × QD32 (overwrites)", iops},
	{"first1m", "1 MiB sequential write QD8 (first writes)", mibs},
	{"write1m", "1 MiB sequential write QD8 (overwrites)", mibs},
	{"randr4k", "4 KiB randread QD32 (image)", iops},
	{"read1m", "1 MiB sequential read QD8 (image)", mibs},
	{"lat4k", "4 KiB randread QD1, completion latency (lower is better)", latency},
	{"firstlat4k", "4 KiB write, one per chunk, QD1, completion latency (first writes; lower is better)", latency},
}

// contenders in the order of the table.
var contenders = []string{"loop", "ublksnap", "ublksnap+s", "dm-snap", "dm-thin"}

// contenderTitles are the column headers.
var contenderTitles = map[string]string{
	"loop":       "kernel loop",
	"ublksnap":   "ublksnap, no snapshot",
	"ublksnap+s": "ublksnap, snapshot taken",
	"dm-snap":    "dm-snapshot (P)",
	"dm-thin":    "dm-thin",
}

// stat sums up one cell's runs.
type stat struct {
	median, q1, q3, min, max float64
	n                        int
}

// summarize returns the quartiles, min and max of vs.
func summarize(vs []float64) stat {
	if len(vs) == 0 {
		return stat{}
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	return stat{median: quantile(s, 0.5), q1: quantile(s, 0.25), q3: quantile(s, 0.75),
		min: s[0], max: s[len(s)-1], n: len(s)}
}

// quantile is the p-quantile of sorted s, interpolated linearly between
// the closest ranks (so the median of an even count is the mean of the
// middle two, and the quartiles of five runs are the second and fourth).
func quantile(s []float64, p float64) float64 {
	h := p * float64(len(s)-1)
	i := int(h)
	if i+1 >= len(s) {
		return s[i]
	}
	return s[i] + (h-float64(i))*(s[i+1]-s[i])
}

// results holds one pass: the statistics by row and contender, and meta.
type results struct {
	cells map[string]map[string]stat // row id → contender → stat
	meta  map[string]string
}

func (r *results) cell(rowID, contender string) stat { return r.cells[rowID][contender] }

// ratio is a/b of two medians, 0 when b has none.
func (r *results) ratio(rowID, a, b string) float64 {
	return div(r.cell(rowID, a).median, r.cell(rowID, b).median)
}

// div is a/b, 0 when b is 0.
func div(a, b float64) float64 {
	if b == 0 {
		return 0
	}
	return a / b
}

// readCSV reads a CSV file with a header line into records.
func readCSV(path string) ([][]string, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	recs, err := csv.NewReader(f).ReadAll()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(recs) == 0 {
		return nil, fmt.Errorf("%s: empty", path)
	}
	return recs[1:], nil
}

// load reads dir/raw.csv and dir/meta.csv.
func load(dir string) (*results, error) {
	raw, err := readCSV(filepath.Join(dir, "raw.csv"))
	if err != nil {
		return nil, err
	}
	values := map[string]map[string][]float64{}
	for i, rec := range raw {
		if len(rec) != 6 {
			return nil, fmt.Errorf("raw.csv line %d: %d fields, want 6", i+2, len(rec))
		}
		rowID, contender := rec[0], rec[1]
		r, ok := findRow(rowID)
		if !ok {
			return nil, fmt.Errorf("raw.csv line %d: unknown row %q", i+2, rowID)
		}
		v, err := strconv.ParseFloat(rec[3+int(r.metric)], 64)
		if err != nil {
			return nil, fmt.Errorf("raw.csv line %d: %w", i+2, err)
		}
		if values[rowID] == nil {
			values[rowID] = map[string][]float64{}
		}
		values[rowID][contender] = append(values[rowID][contender], v)
	}
	res := &results{cells: map[string]map[string]stat{}, meta: map[string]string{}}
	for rowID, byContender := range values {
		res.cells[rowID] = map[string]stat{}
		for c, vs := range byContender {
			res.cells[rowID][c] = summarize(vs)
		}
	}
	meta, err := readCSV(filepath.Join(dir, "meta.csv"))
	if err != nil {
		return nil, err
	}
	for _, rec := range meta {
		if len(rec) == 2 {
			res.meta[rec[0]] = rec[1] // a key written twice keeps its last value
		}
	}
	return res, nil
}

func findRow(id string) (row, bool) {
	for _, r := range rows {
		if r.id == id {
			return r, true
		}
	}
	return row{}, false
}

// metaFloat returns a numeric meta value, 0 when absent.
func (r *results) metaFloat(key string) float64 {
	v, _ := strconv.ParseFloat(r.meta[key], 64)
	return v
}

// target is one goal of the issue, checked against a pass.
type target struct {
	what      string  // the goal, for a reader
	got, want float64 // measured value (0: not measured) and its bound
	atMost    bool    // got must not exceed want (latency, memory), rather than reach it
}

func (t target) met() bool {
	return t.got > 0 && (t.atMost && t.got <= t.want || !t.atMost && t.got >= t.want)
}

func (t target) verdict() string {
	switch {
	case t.got == 0:
		return "**not measured**"
	case t.met():
		return "met"
	case t.atMost:
		return fmt.Sprintf("**missed by %.0f%%**", 100*(t.got/t.want-1))
	}
	return fmt.Sprintf("**missed by %.0f%%**", 100*(1-t.got/t.want))
}

func (t target) wanted() string {
	if t.atMost {
		return fmt.Sprintf("≤ %.2f", t.want)
	}
	return fmt.Sprintf("≥ %.2f", t.want)
}

// goals are the targets of one kernel line (issue 19).
type goals struct {
	noSnap    float64 // no snapshot / loop, each throughput row
	twoCopy   float64 // when set, 1 MiB rows: no snapshot / two-copy bound instead
	latency   float64 // at most: QD1 p50 latency, no snapshot / loop
	image     float64 // image reads / no snapshot
	overwrite float64 // overwrites under a snapshot / no snapshot
	rssMiB    float64 // at most: the daemon's peak RSS
}

var lineGoals = map[string]goals{
	"7":    {noSnap: 0.9, latency: 1.3, image: 0.95, overwrite: 0.95, rssMiB: 128},
	"6.12": {noSnap: 0.8, twoCopy: 0.85, latency: 1.5, image: 0.9, overwrite: 0.95, rssMiB: 192},
}

// goalsOf returns the goals of the kernel line NAME ("7", "6.12", or a
// release of one such as "7.1").
func goalsOf(name string) (goals, error) {
	for line, g := range lineGoals {
		if name == line || strings.HasPrefix(name, line+".") {
			return g, nil
		}
	}
	return goals{}, fmt.Errorf("no targets for kernel line %q (want 7 or 6.12)", name)
}

// targets checks a pass against g: the device without snapshot against
// loop (or the two-copy bound), image reads and overwrites under a
// snapshot against the device without one, and the daemon's peak memory.
func (r *results) targets(g goals) []target {
	var ts []target
	for _, rw := range rows {
		switch {
		case rw.id == "firstlat4k":
			// A first-write row: see cowTargets.
		case rw.id == "randw4k4j":
			// Judged under a snapshot only, below.
		case rw.metric == latency:
			ts = append(ts, target{"QD1 p50 latency, ublksnap without snapshot / loop, " + rw.id,
				r.ratio(rw.id, "ublksnap", "loop"), g.latency, true})
		case rw.metric == mibs && g.twoCopy > 0:
			ts = append(ts, target{"ublksnap without snapshot / two-copy bound, " + rw.id,
				div(r.cell(rw.id, "ublksnap").median, r.metaFloat("two_copy_bound_mib_s")), g.twoCopy, false})
		default:
			ts = append(ts, target{"ublksnap without snapshot / loop, " + rw.id, r.ratio(rw.id, "ublksnap", "loop"), g.noSnap, false})
		}
	}
	for _, id := range []string{"randr4k", "read1m"} {
		ts = append(ts, target{"image reads / no snapshot, " + id, r.ratio(id, "ublksnap+s", "ublksnap"), g.image, false})
	}
	for _, id := range []string{"randw4k", "randw4k4j", "write1m"} {
		ts = append(ts, target{"overwrites under a snapshot / no snapshot, " + id, r.ratio(id, "ublksnap+s", "ublksnap"), g.overwrite, false})
	}
	return append(ts, target{"daemon peak RSS (VmHWM), MiB", r.metaFloat("daemon_vmhwm_kib") / 1024, g.rssMiB, true})
}

// cowTargets checks the first writes under a snapshot (issue 20, alike on
// both lines) against dm-snapshot, dm-thin and the COW bound.
func (r *results) cowTargets() []target {
	iops, mibs := r.cowBound()
	return []target{
		{"first writes / dm-snapshot, first4k", r.ratio("first4k", "ublksnap+s", "dm-snap"), 2.0, false},
		{"first writes / dm-snapshot, first1m", r.ratio("first1m", "ublksnap+s", "dm-snap"), 1.5, false},
		{"first writes / dm-thin, first4k", r.ratio("first4k", "ublksnap+s", "dm-thin"), 1.0, false},
		{"first writes / COW bound, first4k", div(r.cell("first4k", "ublksnap+s").median, iops), 1.0, false},
		{"first writes / COW bound, first1m", div(r.cell("first1m", "ublksnap+s").median, mibs), 1.0, false},
		{"first-write QD1 p50 latency / dm-snapshot, firstlat4k", r.ratio("firstlat4k", "ublksnap+s", "dm-snap"), 1.0, true},
	}
}

// cowBound returns the first-write rates the COW bound allows: 4 KiB
// writes per second when each copies one chunk, and MiB/s of chunks copied.
func (r *results) cowBound() (iops, mibs float64) {
	rd, wr := r.metaFloat("cow_bound_read_chunks_s"), r.metaFloat("cow_bound_write_chunks_s")
	if rd == 0 || wr == 0 {
		return 0, 0
	}
	perChunk := 1/rd + 1/wr
	return 1 / perChunk, r.metaFloat("chunk_bytes") / perChunk / (1 << 20)
}

func formatValue(v float64, m metric) string {
	switch m {
	case iops:
		return humanize.Commaf(float64(int64(v + 0.5)))
	case latency:
		return fmt.Sprintf("%.1f", v)
	}
	return fmt.Sprintf("%.0f", v)
}

// formatRatio prints a ratio, or a dash when one side was not measured.
func formatRatio(v float64) string {
	if v == 0 {
		return "–"
	}
	return fmt.Sprintf("%.2f", v)
}

// kib prints a meta value in KiB as a size.
func (r *results) kib(key string) string { return humanize.IBytes(uint64(r.metaFloat(key) * 1024)) }

// writeMarkdown writes the report of one kernel line.
func (r *results) writeMarkdown(w io.Writer, name string, g goals) error {
	var b strings.Builder
	fmt.Fprintf(&b, "# Benchmark: kernel %s (line %s)\n\n", r.meta["kernel"], name)
	fmt.Fprintf(&b, "One VM boot under qemu TCG, %s CPUs; every device over its own tmpfs file of %s MiB; "+
		"chunk (and dm chunk/block) size %s; fio io_uring, direct=1, one job; "+
		"median [Q1–Q3] of %s interleaved runs, time-based rows %s s. "+
		"loop uses direct I/O: %s. ublksnap's I/O mode: %s, direct I/O on the backing: %s. "+
		"Only ratios mean anything under TCG; a ratio is one of medians.\n\n",
		r.meta["cpus"], r.meta["size_mib"], humanize.IBytes(uint64(r.metaFloat("chunk_bytes"))),
		r.meta["runs"], r.meta["runtime_s"], r.meta["loop_dio"], r.meta["ublksnap_io_mode"], r.meta["ublksnap_direct_io"])
	b.WriteString("| workload | unit |")
	for _, c := range contenders {
		fmt.Fprintf(&b, " %s |", contenderTitles[c])
	}
	b.WriteString(" no-snap / loop | snap / dm-snap |\n|---|---|")
	for range contenders {
		b.WriteString("---:|")
	}
	b.WriteString("---:|---:|\n")
	for _, rw := range rows {
		fmt.Fprintf(&b, "| %s | %s |", rw.title, rw.metric.unit())
		for _, c := range contenders {
			if s := r.cell(rw.id, c); s.n == 0 {
				b.WriteString(" – |")
			} else {
				fmt.Fprintf(&b, " %s [%s–%s] |", formatValue(s.median, rw.metric), formatValue(s.q1, rw.metric), formatValue(s.q3, rw.metric))
			}
		}
		fmt.Fprintf(&b, " %s | %s |\n", formatRatio(r.ratio(rw.id, "ublksnap", "loop")), formatRatio(r.ratio(rw.id, "ublksnap+s", "dm-snap")))
	}
	iops, mibs := r.cowBound()
	b.WriteString("\n## First writes against the COW bound\n\n")
	fmt.Fprintf(&b, "Reading one chunk and writing one chunk of tmpfs from user space (psync) allows %.0f first writes/s, "+
		"or %.0f MiB/s of chunks copied, one copy at a time.\n\n", iops, mibs)
	if iops > 0 {
		fmt.Fprintf(&b, "- 4 KiB one per chunk: ublksnap %.2f × the bound, dm-snapshot %.2f ×\n",
			r.cell("first4k", "ublksnap+s").median/iops, r.cell("first4k", "dm-snap").median/iops)
		fmt.Fprintf(&b, "- 1 MiB sequential: ublksnap %.2f × the bound, dm-snapshot %.2f ×\n",
			r.cell("first1m", "ublksnap+s").median/mibs, r.cell("first1m", "dm-snap").median/mibs)
	}
	bound := r.metaFloat("two_copy_bound_mib_s")
	b.WriteString("\n## 1 MiB without snapshot against the two-copy bound\n\n")
	fmt.Fprintf(&b, "User space reads a tmpfs file at %.0f MiB/s and writes one at %.0f MiB/s (psync, 1 MiB); "+
		"a byte read into a buffer and written out of it, the two copies of ublk's copy mode, moves at %.0f MiB/s. "+
		"ublksnap without snapshot, as × that bound:", r.metaFloat("two_copy_read_mib_s"), r.metaFloat("two_copy_write_mib_s"), bound)
	for _, id := range []string{"first1m", "write1m", "read1m"} {
		fmt.Fprintf(&b, " %s %s", id, formatRatio(div(r.cell(id, "ublksnap").median, bound)))
	}
	b.WriteString(".\n\n## Memory and storage\n\n")
	fmt.Fprintf(&b, "- daemon peak RSS (VmHWM) over the whole run, two devices and two images: %s (diff_buffer_memory_limit %s)\n",
		r.kib("daemon_vmhwm_kib"), humanize.IBytes(uint64(r.metaFloat("diff_buffer_memory_limit_bytes"))))
	fmt.Fprintf(&b, "- its peaks sampled every second: RssAnon %s, RssFile %s, RssShmem %s\n",
		r.kib("daemon_peak_rss_anon_kib"), r.kib("daemon_peak_rss_file_kib"), r.kib("daemon_peak_rss_shmem_kib"))
	fmt.Fprintf(&b, "- difference storage used after a run (one device, every chunk copied): %s\n",
		humanize.IBytes(uint64(r.metaFloat("ublksnap_diff_used_bytes"))))
	if s := r.meta["dm_snap_status"]; s != "" {
		fmt.Fprintf(&b, "- dm-snapshot status after a run (allocated/total metadata sectors): %s\n", s)
	}
	fmt.Fprintf(&b, "\n## Targets of kernel line %s (met: the ratio of medians meets it)\n\n| target | measured | wanted | |\n|---|---:|---:|---|\n", name)
	for _, t := range r.targets(g) {
		fmt.Fprintf(&b, "| %s | %.2f | %s | %s |\n", t.what, t.got, t.wanted(), t.verdict())
	}
	b.WriteString("\n## Copy-on-write targets (both lines)\n\n| target | measured | wanted | |\n|---|---:|---:|---|\n")
	for _, t := range r.cowTargets() {
		fmt.Fprintf(&b, "| %s | %.2f | %s | %s |\n", t.what, t.got, t.wanted(), t.verdict())
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// writeCSV writes one line per row and contender: quartiles, ratios.
func (r *results) writeCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	_ = cw.Write([]string{"kernel", "row", "unit", "contender", "median", "q1", "q3", "min", "max", "runs", "ratio_loop", "ratio_dm_snap"})
	f := func(v float64) string { return strconv.FormatFloat(v, 'f', 2, 64) }
	for _, rw := range rows {
		for _, c := range contenders {
			s := r.cell(rw.id, c)
			_ = cw.Write([]string{r.meta["kernel"], rw.id, rw.metric.unit(), c, f(s.median), f(s.q1), f(s.q3), f(s.min), f(s.max),
				strconv.Itoa(s.n), f(r.ratio(rw.id, c, "loop")), f(r.ratio(rw.id, c, "dm-snap"))})
		}
	}
	cw.Flush()
	return cw.Error()
}

func main() {
	in := flag.String("in", "", "directory with raw.csv and meta.csv of one bench/run.sh pass")
	out := flag.String("out", "bench/results", "directory for NAME.md, NAME.csv and NAME.png")
	name := flag.String("name", "", "the kernel line, 7 or 6.12: it picks the targets")
	flag.Parse()
	if *in == "" || *name == "" || flag.NArg() > 0 {
		fmt.Fprintln(os.Stderr, "usage: report -in DIR -name LINE [-out DIR]")
		os.Exit(2)
	}
	if err := run(*in, *out, *name); err != nil {
		fmt.Fprintln(os.Stderr, "report:", err)
		os.Exit(1)
	}
}

func run(in, out, name string) error {
	g, err := goalsOf(name)
	if err != nil {
		return err
	}
	res, err := load(in)
	if err != nil {
		return fmt.Errorf("read pass %s: %w", in, err)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		return err
	}
	base := filepath.Join(out, name)
	write := func(ext string, fn func(io.Writer) error) error {
		f, err := os.Create(base + ext)
		if err != nil {
			return err
		}
		return errors.Join(fn(f), f.Close())
	}
	if err := write(".md", func(w io.Writer) error { return res.writeMarkdown(w, name, g) }); err != nil {
		return err
	}
	if err := write(".csv", res.writeCSV); err != nil {
		return err
	}
	if err := res.writeChart(base+".png", name); err != nil {
		return fmt.Errorf("chart: %w", err)
	}
	fmt.Printf("report: %s.md, .csv, .png\n", base)
	return nil
}
