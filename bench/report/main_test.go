package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestSummarize(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want stat
	}{
		{nil, stat{}},
		{[]float64{3}, stat{median: 3, q1: 3, q3: 3, min: 3, max: 3, n: 1}},
		{[]float64{5, 1, 3}, stat{median: 3, q1: 2, q3: 4, min: 1, max: 5, n: 3}},
		{[]float64{4, 1, 2, 8}, stat{median: 3, q1: 1.75, q3: 5, min: 1, max: 8, n: 4}},
		// Five runs: the quartiles are the second and fourth.
		{[]float64{50, 10, 40, 20, 30}, stat{median: 30, q1: 20, q3: 40, min: 10, max: 50, n: 5}},
	} {
		if got := summarize(tc.in); got != tc.want {
			t.Errorf("summarize(%v) = %+v, want %+v", tc.in, got, tc.want)
		}
	}
}

// writePass writes raw.csv and meta.csv the way bench/run.sh does.
func writePass(t *testing.T, raw, meta []string) string {
	t.Helper()
	in := t.TempDir()
	for name, lines := range map[string][]string{
		"raw.csv":  append([]string{"row,contender,run,iops,mib_s,clat_p50_us"}, raw...),
		"meta.csv": append([]string{"key,value"}, meta...),
	} {
		if err := os.WriteFile(filepath.Join(in, name), []byte(strings.Join(lines, "\n")+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return in
}

// pass is a pass whose verdicts differ between the kernel lines.
var pass = struct{ raw, meta []string }{
	raw: []string{
		"first4k,loop,1,1000,4,0", "first4k,loop,2,3000,12,0", "first4k,loop,3,2000,8,0",
		"first4k,ublksnap,1,1900,7,0", "first4k,ublksnap+s,1,600,2,0", "first4k,dm-snap,1,300,1,0",
		// 4 KiB reads without snapshot: 0.85 × loop by the median, though
		// two runs of five reach loop.
		"randr4k,loop,1,1000,4,0", "randr4k,loop,2,1000,4,0", "randr4k,loop,3,1000,4,0",
		"randr4k,ublksnap,1,1000,4,0", "randr4k,ublksnap,2,850,3,0", "randr4k,ublksnap,3,850,3,0",
		"randr4k,ublksnap,4,1000,4,0", "randr4k,ublksnap,5,850,3,0",
		"read1m,loop,1,100,400,0", "read1m,ublksnap,1,90,360,0", "read1m,ublksnap+s,1,80,342,0",
		"read1m,dm-snap,1,100,380,0", "read1m,dm-thin,1,100,390,0",
		// QD1 latency: ublksnap 1.4 × loop.
		"lat4k,loop,1,9000,35,100", "lat4k,loop,2,8000,31,120", "lat4k,loop,3,9500,37,90",
		"lat4k,ublksnap,1,7000,27,140", "lat4k,ublksnap,2,7000,27,140",
	},
	meta: []string{
		"kernel,7.3.4", "chunk_bytes,262144", "runs,5", "daemon_vmhwm_kib,153600",
		"daemon_peak_rss_anon_kib,102400", "daemon_peak_rss_file_kib,2048", "daemon_peak_rss_shmem_kib,0",
		"diff_buffer_memory_limit_bytes,67108864", "cow_bound_read_chunks_s,1000", "cow_bound_write_chunks_s,1000",
		"two_copy_read_mib_s,900", "two_copy_write_mib_s,900", "two_copy_bound_mib_s,450",
		"ublksnap_io_mode,zero-copy", "ublksnap_direct_io,false",
	},
}

func TestLoad(t *testing.T) {
	res, err := load(writePass(t, pass.raw, pass.meta))
	if err != nil {
		t.Fatal(err)
	}
	if got := res.cell("first4k", "loop"); got.median != 2000 || got.q1 != 1500 || got.q3 != 2500 {
		t.Errorf("first4k loop = %+v, want median 2000, quartiles 1500 and 2500", got)
	}
	if got := res.ratio("first4k", "ublksnap+s", "dm-snap"); got != 2 {
		t.Errorf("first writes / dm-snap = %v, want 2", got)
	}
	if got := res.ratio("read1m", "ublksnap", "loop"); got != 0.9 { // MiB/s for 1 MiB rows
		t.Errorf("read1m ratio = %v, want 0.9", got)
	}
	if got := res.cell("lat4k", "loop").median; got != 100 { // µs for the latency row
		t.Errorf("lat4k loop median = %v, want 100", got)
	}
	if iops, mibs := res.cowBound(); iops != 500 || mibs != 125 {
		t.Errorf("cow bound = %v IOPS, %v MiB/s; want 500, 125", iops, mibs)
	}
	for key, want := range map[string]float64{
		"two_copy_bound_mib_s": 450, "daemon_peak_rss_anon_kib": 102400, "daemon_peak_rss_file_kib": 2048,
	} {
		if got := res.metaFloat(key); got != want {
			t.Errorf("meta %s = %v, want %v", key, got, want)
		}
	}
	if got := res.meta["ublksnap_io_mode"]; got != "zero-copy" {
		t.Errorf("io mode = %q", got)
	}
}

func TestTargetsPerLine(t *testing.T) {
	res, err := load(writePass(t, pass.raw, pass.meta))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		line string
		want map[string]bool // target → met
	}{
		{"7", map[string]bool{
			"ublksnap without snapshot / loop, first4k":                true,  // 0.95
			"ublksnap without snapshot / loop, randr4k":                false, // 0.85 by the median
			"ublksnap without snapshot / loop, read1m":                 true,  // 0.9
			"QD1 p50 latency, ublksnap without snapshot / loop, lat4k": false, // 1.4 > 1.3
			"image reads / no snapshot, read1m":                        true,  // 0.95
			"overwrites under a snapshot / no snapshot, write1m":       false, // not measured
			"daemon peak RSS (VmHWM), MiB":                             false, // 150 > 128
		}},
		{"6.12", map[string]bool{
			"ublksnap without snapshot / loop, first4k":                true,  // 0.95 ≥ 0.8
			"ublksnap without snapshot / loop, randr4k":                true,  // 0.85 ≥ 0.8
			"ublksnap without snapshot / two-copy bound, read1m":       false, // 360/450 = 0.8 < 0.85
			"QD1 p50 latency, ublksnap without snapshot / loop, lat4k": true,  // 1.4 ≤ 1.5
			"image reads / no snapshot, read1m":                        true,
			"daemon peak RSS (VmHWM), MiB":                             true, // 150 ≤ 192
		}},
	} {
		g, err := goalsOf(tc.line)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]bool{}
		for _, tg := range res.targets(g) {
			got[tg.what] = tg.met()
		}
		for what, want := range tc.want {
			if met, ok := got[what]; !ok || met != want {
				t.Errorf("line %s: target %q met = %v (present %v), want %v", tc.line, what, met, ok, want)
			}
		}
		if _, ok := got["ublksnap without snapshot / loop, read1m"]; ok && g.twoCopy > 0 {
			t.Errorf("line %s: read1m held to loop, not to the two-copy bound", tc.line)
		}
	}
}

func TestGoalsOf(t *testing.T) {
	for name, ok := range map[string]bool{"7": true, "7.1": true, "6.12": true, "6.12.9": true, "6.1": false, "8": false, "": false} {
		if _, err := goalsOf(name); (err == nil) != ok {
			t.Errorf("goalsOf(%q) = %v, want ok %v", name, err, ok)
		}
	}
}

func TestTargetDirection(t *testing.T) {
	for _, tc := range []struct {
		t       target
		met     bool
		verdict string
	}{
		{target{got: 0.9, want: 0.9}, true, "met"},
		{target{got: 0.45, want: 0.9}, false, "**missed by 50%**"},
		{target{got: 1.2, want: 1.3, atMost: true}, true, "met"},
		{target{got: 1.95, want: 1.3, atMost: true}, false, "**missed by 50%**"},
		{target{got: 0, want: 1.3, atMost: true}, false, "**not measured**"}, // 0 is no measurement, not a fast one
	} {
		if got := tc.t.met(); got != tc.met {
			t.Errorf("%+v met = %v, want %v", tc.t, got, tc.met)
		}
		if got := tc.t.verdict(); got != tc.verdict {
			t.Errorf("%+v verdict = %q, want %q", tc.t, got, tc.verdict)
		}
	}
	res, err := load(writePass(t, pass.raw, pass.meta))
	if err != nil {
		t.Fatal(err)
	}
	lat, _ := findRow("lat4k")
	if got := res.gain(lat, "ublksnap"); got != 100.0/140 { // the chart's bar: loop's latency / ublksnap's
		t.Errorf("lat4k gain = %v, want %v", got, 100.0/140)
	}
}

// TestReportFromPass checks the three files of the report.
func TestReportFromPass(t *testing.T) {
	in := writePass(t, pass.raw, pass.meta)
	out := t.TempDir()
	if err := run(in, out, "6.12"); err != nil {
		t.Fatal(err)
	}
	md, err := os.ReadFile(filepath.Join(out, "6.12.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"kernel 7.3.4", "| 2,000 [1,500–2,500] |", "| 100.0 [95.0–110.0] |", "I/O mode: zero-copy",
		"RssAnon 100 MiB", "at 450 MiB/s", "| ≤ 1.50 | met |", "**missed by", "**not measured**"} {
		if !strings.Contains(string(md), want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	for _, f := range []string{"6.12.csv", "6.12.png"} {
		if st, err := os.Stat(filepath.Join(out, f)); err != nil || st.Size() == 0 {
			t.Errorf("%s: %v", f, err)
		}
	}
	if err := run(in, out, "5.10"); err == nil {
		t.Error("a line without targets was accepted")
	}
}

func TestLoadRejects(t *testing.T) {
	for _, tc := range []struct{ line, err string }{
		{"bogus,loop,1,1,1,1", "unknown row"},
		{"read1m,loop,1,1,1", "wrong number of fields"}, // the raw.csv of the earlier method
	} {
		if _, err := load(writePass(t, []string{tc.line}, nil)); err == nil || !strings.Contains(err.Error(), tc.err) {
			t.Errorf("load(%q) = %v, want an error with %q", tc.line, err, tc.err)
		}
	}
}
