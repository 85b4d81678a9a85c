package nbd

import (
	"errors"
	"fmt"
	"io"
)

// Export is what a client sees under one name: Size bytes read from Data,
// and the metadata contexts it may select for BLOCK_STATUS.
type Export struct {
	Name        string // what clients ask for; unique per Server
	Description string // shown by LIST and INFO; may be empty
	Size        int64  // bytes
	// Data serves READ. It must be safe for concurrent use.
	Data io.ReaderAt
	// Contexts names the metadata contexts that LIST_META_CONTEXT shows
	// (without a query, or for a query ending in ':' that prefixes them).
	Contexts []string
	// Context returns the metadata context called name, listed or not,
	// or nil if there is none. Nil means no context at all.
	Context func(name string) MetaContext
}

// MetaContext answers BLOCK_STATUS in one metadata context: the status
// of the bytes from off, consecutive, starting at off. They may cover less
// than length (the client asks again from where they end) or more, and
// must cover at least one byte; the server trims them to the export.
type MetaContext func(off, length int64) ([]Extent, error)

// Extent is a run of bytes with one status.
type Extent struct {
	Length int64
	Flags  uint32
}

// Status flags of the base:allocation context.
const (
	StateHole = 1 << 0 // not allocated
	StateZero = 1 << 1 // reads as zeros
)

// StateDirty marks a changed extent in a qemu:dirty-bitmap: context.
const StateDirty = 1 << 0

// BaseAllocation is the name of the standard allocation context.
const BaseAllocation = "base:allocation"

// AllData is a base:allocation context that knows nothing better than
// "allocated data" for every byte, which is always a correct answer.
func AllData(off, length int64) ([]Extent, error) {
	return []Extent{{Length: length}}, nil
}

// ErrInvalidExport reports an Export a Server cannot serve.
var ErrInvalidExport = errors.New("nbd: invalid export")

func (e *Export) validate() error {
	switch {
	case e.Name == "" || len(e.Name) > maxStringLength:
		return fmt.Errorf("%w: name %q: want 1 to %d bytes", ErrInvalidExport, e.Name, maxStringLength)
	case len(e.Description) > maxStringLength:
		return fmt.Errorf("%w: %s: description longer than %d bytes", ErrInvalidExport, e.Name, maxStringLength)
	case e.Size <= 0:
		return fmt.Errorf("%w: %s: size %d", ErrInvalidExport, e.Name, e.Size)
	case e.Data == nil:
		return fmt.Errorf("%w: %s: no data", ErrInvalidExport, e.Name)
	}
	return nil
}

// context resolves a context name for e.
func (e *Export) context(name string) MetaContext {
	if e.Context == nil {
		return nil
	}
	return e.Context(name)
}
