package cbt

import "sync/atomic"

// atomicBytes is an array of bytes that are read and raised atomically
// without a lock, packed four to an atomic word: change tracking marks
// from every queue of a device at once share no mutex.
type atomicBytes struct {
	words []atomic.Uint32
	n     int64 // bytes in the array
}

func newAtomicBytes(n int64) atomicBytes {
	return atomicBytes{words: make([]atomic.Uint32, (n+3)/4), n: n}
}

// get returns byte i.
func (a *atomicBytes) get(i int64) byte { return byte(a.words[i/4].Load() >> (8 * (i % 4))) }

// raise sets byte i to v unless it is v or more already.
func (a *atomicBytes) raise(i int64, v byte) {
	w, shift := &a.words[i/4], 8*uint(i%4)
	for {
		old := w.Load()
		if byte(old>>shift) >= v || w.CompareAndSwap(old, old&^(0xff<<shift)|uint32(v)<<shift) {
			return
		}
	}
}

// copyTo copies the bytes into dst, of the same length.
func (a *atomicBytes) copyTo(dst []byte) {
	for i := range dst {
		dst[i] = a.get(int64(i))
	}
}

// set makes the bytes those of src, of the same length. Nothing may raise
// a byte meanwhile.
func (a *atomicBytes) set(src []byte) {
	for w := range a.words {
		var v uint32
		for j := range 4 {
			if i := 4*w + j; i < len(src) {
				v |= uint32(src[i]) << (8 * j)
			}
		}
		a.words[w].Store(v)
	}
}

// bytes returns a copy of the array.
func (a *atomicBytes) bytes() []byte {
	b := make([]byte, a.n)
	a.copyTo(b)
	return b
}
