package main

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/ublksnap/ublksnap/cow"
)

// paramFlag is the command-line flag of one of blksnap's parameters: sizes
// take human units (64MiB; a bare number is bytes) and shifts and counts
// whole numbers. Its String is the current value, so --help shows the
// real default.
type paramFlag struct {
	params *cow.Params
	name   string // blksnap's name, e.g. diff_storage_minimum
}

func (f paramFlag) unit() cow.Unit { return cow.ParamUnit(f.name) }

func (f paramFlag) String() string {
	v, _ := f.params.Get(f.name)
	switch f.unit() {
	case cow.UnitSectors:
		return humanize.IBytes(uint64(v) << 9)
	case cow.UnitBytes:
		return humanize.IBytes(uint64(v))
	}
	return strconv.FormatInt(v, 10)
}

func (f paramFlag) Type() string {
	if f.unit() == cow.UnitCount {
		return "int"
	}
	return "size"
}

func (f paramFlag) Set(s string) error {
	var v int64
	if f.unit() == cow.UnitCount {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return fmt.Errorf("%q is not a whole number", s)
		}
		v = n
	} else {
		n, err := humanize.ParseBytes(s)
		if err != nil || n > 1<<62 {
			return fmt.Errorf("%q is not a size (examples: 64MiB, 1GiB)", s)
		}
		v = int64(n)
		if f.unit() == cow.UnitSectors {
			if v%512 != 0 {
				return fmt.Errorf("%q is not a multiple of 512 bytes", s)
			}
			v >>= 9
		}
	}
	return f.params.Set(f.name, v)
}

// flagName turns blksnap's chunk_minimum_shift into chunk-minimum-shift.
func flagName(param string) string { return strings.ReplaceAll(param, "_", "-") }

// paramUsage is the help line of a parameter's flag.
func paramUsage(name string) string {
	if name == "chunk_copy_in_kernel" {
		return "1: save a chunk with copy_file_range where the original and the difference storage are regular files of one file system; 0: through a chunk buffer, as blksnap"
	}
	switch cow.ParamUnit(name) {
	case cow.UnitSectors, cow.UnitBytes:
		return "blksnap's " + name + ", a size such as 64MiB"
	}
	return "blksnap's " + name
}

// checkParams fails with a usage error naming the flag and value of each
// parameter out of bounds.
func checkParams(cmd *cobra.Command, params *cow.Params) error {
	probs := params.Check()
	if len(probs) == 0 {
		return nil
	}
	lines := make([]string, len(probs))
	for i, p := range probs {
		lines[i] = fmt.Sprintf("--%s %s: %v", flagName(p.Name), paramFlag{params, p.Name}, p)
	}
	return usagef("bad blksnap parameters; see %s --help:\n  %s", cmd.CommandPath(), strings.Join(lines, "\n  "))
}
