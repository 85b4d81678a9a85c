package cow

import (
	"errors"
	"testing"
)

// Every name Set accepts, Get reads back, with the unit its flag shows.
func TestParamsGetAndUnits(t *testing.T) {
	p := DefaultParams()
	names := ParamNames()
	if len(names) != 11 {
		t.Fatalf("ParamNames = %v, want blksnap's 9, diff_buffer_memory_limit and chunk_copy_in_kernel", names)
	}
	for i, name := range names {
		v, ok := p.Get(name)
		if !ok || v <= 0 {
			t.Errorf("Get(%q) = %d, %v on the defaults", name, v, ok)
		}
		q := p
		if err := q.Set(name, v+int64(i)+1); err != nil {
			t.Fatal(err)
		}
		if got, _ := q.Get(name); got != v+int64(i)+1 {
			t.Errorf("Set(%q, %d) then Get = %d", name, v+int64(i)+1, got)
		}
	}
	if v, ok := p.Get("diff_storage_minimum"); v != 2097152 || !ok {
		t.Errorf("diff_storage_minimum = %d, want blksnap's 2097152 sectors (1 GiB)", v)
	}
	if _, ok := p.Get("no_such_parameter"); ok {
		t.Error("Get knows no_such_parameter")
	}
	for name, want := range map[string]Unit{
		"diff_storage_minimum":     UnitSectors,
		"diff_buffer_memory_limit": UnitBytes,
		"chunk_minimum_shift":      UnitCount,
		"chunk_maximum_in_queue":   UnitCount,
	} {
		if got := ParamUnit(name); got != want {
			t.Errorf("ParamUnit(%q) = %d, want %d", name, got, want)
		}
	}
}

// Check names the parameter at fault; Validate wraps the same errors.
func TestParamsCheckNamesTheParameter(t *testing.T) {
	if probs := DefaultParams().Check(); len(probs) != 0 {
		t.Fatalf("defaults: %v", probs)
	}
	p := DefaultParams()
	p.DiffStorageMinimum = 256 // 128 KiB: less than two 256 KiB chunks
	p.ChunkMaximumShift = 31
	probs := p.Check()
	if len(probs) != 2 || probs[0].Name != "chunk_maximum_shift" || probs[1].Name != "diff_storage_minimum" {
		t.Fatalf("Check = %v, want chunk_maximum_shift and diff_storage_minimum", probs)
	}
	err := p.Validate()
	var pe *ParamError
	if !errors.Is(err, ErrInvalidParams) || !errors.As(err, &pe) || pe.Name != "chunk_maximum_shift" {
		t.Errorf("Validate = %v; want ErrInvalidParams wrapping the ParamErrors", err)
	}
}
