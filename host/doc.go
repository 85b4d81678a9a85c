// Package host is the snapshot core's adapter to the running system: it
// implements snapshot.BlockServer with package ublk (UblkServer) and
// snapshot.Host with the machine's mount tables, /proc and the filesystem
// freeze ioctls (System).
//
// # Finding a device's filesystems and holders
//
// The daemon lives in a private mount namespace, so the filesystems of a
// device are looked for in the mount table of the request's caller
// (package internal/caller), then in init's, then in the daemon's own,
// and each mount point is opened through the root of the process whose
// table showed it. A mount is named as the caller sees it; one only
// another table shows is named with the process whose view it is. The
// processes holding a device open are found by scanning /proc/*/fd, and a
// kernel holder (device-mapper, swap) by an exclusive open.
//
// # Freezing
//
// A take freezes the filesystems of its devices with FIFREEZE and thaws
// them with FITHAW. System.FreezeHolder runs the freeze in a separate
// process (RunFreezeHolder, see freeze.go) so that a daemon dying during
// a take never leaves a filesystem frozen.
package host
