package storage

// DataFD is a stand-in until the O_DIRECT descriptor lands.
func (d *File) DataFD() int { return d.fd }

// DirectIO is a stand-in until the O_DIRECT descriptor lands.
func (d *File) DirectIO() bool { return false }
