package snapshot

import (
	"context"
	"slices"
)

// Declared is a filtered device the host's configuration declares
// (package internal/devconf), and what became of it when the daemon
// started.
type Declared struct {
	Source  string        // where it is declared, FILE:LINE
	Options AttachOptions // what to attach; Name is set
	Device  string        // the filtered device serving it; "" if none
	Err     error         // why none serves it
}

// AttachDeclared attaches every declared device not served yet and keeps
// what happened for Status. One an earlier daemon served under the same
// name and backing (recovered) is left as it is; one that fails does not
// stop the others; an entry whose Err is set already (a line that does
// not parse) is only recorded.
func (m *Manager) AttachDeclared(ctx context.Context, decls []Declared) []Declared {
	out := slices.Clone(decls)
	for i := range out {
		d := &out[i]
		if d.Err != nil {
			continue
		}
		if node := m.servedAs(d.Options); node != "" {
			d.Device = node
			continue
		}
		info, err := m.Attach(ctx, d.Options)
		d.Device, d.Err = info.Path, err
	}
	m.mu.Lock()
	m.declared = out
	m.mu.Unlock()
	return out
}

// servedAs returns the node of the device served under opt's name over
// the backing opt names, or "".
func (m *Manager) servedAs(opt AttachOptions) string {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, d := range m.devices {
		if d.name == opt.Name && d.backing.name == opt.Backing {
			return d.path()
		}
	}
	return ""
}
