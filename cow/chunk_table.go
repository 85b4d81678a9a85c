package cow

import (
	"math/bits"
	"sync/atomic"
)

// The shape of a chunkTable: leaves of 2^chunkLeafBits chunk pointers
// (512 bytes) under interior nodes of 2^chunkFanBits child pointers
// (2 KiB), as many levels as the device's chunk count needs: three for a
// 1 TiB device of 256 KiB chunks (4 Mi chunks).
const (
	chunkLeafBits = 6
	chunkFanBits  = 8
)

// chunkTable is the sparse map of a difference area's chunks, read and
// added to without a lock: a radix tree of atomic pointers whose nodes
// are made when a chunk under them is first touched, so that memory grows
// with the chunks touched (a chunk touched alone costs a leaf), not with
// the device. A lookup is one atomic load per level; an insert is a
// compare-and-swap, whose loser takes the winner's chunk (or node).
// Chunks are only added, never removed.
type chunkTable struct {
	count  uint64     // chunks of the device: numbers 0 to count-1; immutable
	levels int        // interior levels above the leaves; immutable
	root   *chunkNode // a leaf when levels is 0; immutable
}

// chunkNode is an interior node (kids) or a leaf (chunks) of a chunkTable.
type chunkNode struct {
	kids   []atomic.Pointer[chunkNode]
	chunks []atomic.Pointer[Chunk]
}

func newChunkNode(leaf bool) *chunkNode {
	if leaf {
		return &chunkNode{chunks: make([]atomic.Pointer[Chunk], 1<<chunkLeafBits)}
	}
	return &chunkNode{kids: make([]atomic.Pointer[chunkNode], 1<<chunkFanBits)}
}

// newChunkTable returns an empty table for chunks 0 to count-1.
func newChunkTable(count uint64) *chunkTable {
	levels := 0
	for need := bits.Len64(max(count, 1) - 1); chunkLeafBits+levels*chunkFanBits < need; {
		levels++
	}
	return &chunkTable{count: count, levels: levels, root: newChunkNode(levels == 0)}
}

// slot returns the pointer to chunk nr, making the nodes on its way if
// create is set; nil if nr is out of range or a node on its way does not
// exist.
func (t *chunkTable) slot(nr uint64, create bool) *atomic.Pointer[Chunk] {
	if nr >= t.count {
		return nil
	}
	n := t.root
	for l := t.levels; l > 0; l-- {
		kid := &n.kids[(nr>>(chunkLeafBits+(l-1)*chunkFanBits))&(1<<chunkFanBits-1)]
		next := kid.Load()
		if next == nil {
			if !create {
				return nil
			}
			if fresh := newChunkNode(l == 1); kid.CompareAndSwap(nil, fresh) {
				next = fresh
			} else {
				next = kid.Load()
			}
		}
		n = next
	}
	return &n.chunks[nr&(1<<chunkLeafBits-1)]
}

// lookup returns chunk nr, or nil if it was never added.
func (t *chunkTable) lookup(nr uint64) *Chunk {
	if s := t.slot(nr, false); s != nil {
		return s.Load()
	}
	return nil
}

// getOrAdd returns chunk nr (which must be in range), adding c if there
// is none yet.
func (t *chunkTable) getOrAdd(nr uint64, c *Chunk) *Chunk {
	s := t.slot(nr, true)
	if s.CompareAndSwap(nil, c) {
		return c
	}
	return s.Load()
}

// each calls fn for every chunk, in ascending order of number, until fn
// returns false.
func (t *chunkTable) each(fn func(*Chunk) bool) { t.root.each(fn) }

func (n *chunkNode) each(fn func(*Chunk) bool) bool {
	for i := range n.chunks {
		if c := n.chunks[i].Load(); c != nil && !fn(c) {
			return false
		}
	}
	for i := range n.kids {
		if k := n.kids[i].Load(); k != nil && !k.each(fn) {
			return false
		}
	}
	return true
}
