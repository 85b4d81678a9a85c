// Package snapshot is the core of ublksnap: what blksnap's tracker.c,
// snapshot.c and snapimage.c do. It owns the filtered devices, the
// snapshots and their images, and builds on package ublk (block devices),
// storage (backing devices, difference storage) and cow (the chunk engine).
// It speaks its own types; the daemon maps them to the wire.
//
// # Objects and lifetimes
//
//	Manager    every device and snapshot of one daemon
//	device     a filtered device, from Attach to Detach: an open backing
//	           storage.File, its cow.Original, a gate, and the BlockDevice
//	           (/dev/ublkbN) whose handler sends reads to the backing and
//	           writes through the gate and the COW engine
//	snapshot   from CreateSnapshot to Destroy: a storage.DiffStorage shared
//	           by its members, and the members
//	member     a device in a snapshot; from Take on, its cow.DiffArea and
//	           its image (a second BlockDevice served from the area)
//
// A device is in at most one snapshot. A snapshot is created (storage and
// members may be added), then taken once, then destroyed. Its image exists
// only after the take has switched its original to COW, so it shows the
// snapshot instant from the first byte anyone can read.
//
// # Ending things
//
// Each way an object ends has one verb; what it needs and leaves behind:
//
//	Destroy      a snapshot, asked for: out of the manager under the lock,
//	             then teardown without it; storage it created is removed
//	teardown     a snapshot already out of the manager: release, bounded
//	             by the destroy timeout, then its members are free again
//	release      undoes a take, fully or in part: areas closed, members
//	             off COW, images stopped; waits for I/O (the caller
//	             chooses whether under the lock)
//	abandon      a snapshot that cannot go on or was saved for the next
//	             daemon: areas and storage closed, its files left as they
//	             are
//	end          marks a snapshot ended (wakes its event waiters); no I/O
//	closeDevice  a filtered device out of the manager (Detach, Close):
//	             close, keeping the change map of a backing file
//	close        stops the served device, flushes and closes its backing
//	             (closeThen runs a last step between the two)
//	Leave        the whole manager, for a successor: taken snapshots
//	             saved, devices kept in the kernel, state written
//	Close        the whole manager, for good: snapshots torn down, then
//	             the devices closed
//
// (A request leaving a device's gate is gate.Leave, of package admit's
// door: not an end.)
//
// # Locks
//
// Manager.mu guards the maps of devices and snapshots, device.snap and
// every snapshot's members, taken flag and take in progress. It is not
// held across a freeze or a wait for I/O: Take marks the snapshot as being
// taken (snapshot.taking), works on copies of its members without the
// lock (areas, freeze, pause, switch, resume, thaw, images), and publishes
// them under it when it has succeeded; meanwhile no device is added to the
// snapshot, and Destroy, Leave and Close wait for the take to end.
// Destroy removes the snapshot from the map under the lock, then releases
// it without the lock, bounded by Config.DestroyTimeout, and takes the
// lock again only to free the members. Who holds a device (mount tables,
// /proc) is found without the lock, and the device or snapshot looked up
// again after. WaitEvent waits without it. The state file is encoded under it
// and written after it is unlocked (stateWriter: writes are serialized
// and a superseded one is skipped), except by Attach, which undoes the
// attach when the write fails. Attach and CreateSnapshot still open their
// backing or storage and create the device or file under the lock, so
// that no other request takes the same file meanwhile.
//
// Each device's gate admits its data-changing requests: a take pauses the
// gates of all members (new writes wait, admitted ones drain), switches
// every member to COW at one instant, and resumes them. The pause is
// bounded by Config.TakeTimeout; filesystems are frozen around it.
//
// # Memory
//
// The Manager creates one cow.BufferBudget of Params.DiffBufferMemoryLimit
// bytes and gives it to every difference area it creates or restores: the
// chunk buffers of all members of all snapshots together stay within it,
// whatever the number of devices (see package cow). Params, and so the
// budget, are fixed when the Manager is created; a daemon started with
// other parameters gets a budget of its own size.
//
// # Change tracking
//
// Every device has a cbt.Map from attach on: its handler marks each
// admitted change inside the gate, a take switches the maps of all
// members while their gates are paused, and image writes and MarkDirty
// mark both maps. Maps are saved only when no write can have been missed
// (cbt.go): at a planned restart, with the gates paused for good, and at
// the detach of a regular file; a crash starts a new generation.
//
// # Where paths are resolved
//
// Paths in requests are absolute and resolved in the caller's view of the
// filesystem (package internal/caller): the daemon runs in a private mount namespace
// and would not see filesystems mounted after it started. Difference
// storage and backings are compared by device number and inode with every
// device the manager serves, so that no storage is written through the COW
// path of a device it serves.
//
// # Surviving the daemon
//
// With Config.StatePath set, filtered devices are created recoverable and
// tagged with an owner derived from the path, and the state file records
// each one (ublk id, name, backing and its identity), rewritten atomically
// under Manager.mu before an attach or detach is answered (state.go). When
// the daemon dies the kernel holds their I/O; Recover, run by the next
// daemon before its first request, reopens each backing, checks that it is
// the same file and serves the same /dev/ublkbN again. After a crash the
// snapshots are lost (their chunk maps lived in memory): their images,
// tagged as ours but not recorded, are deleted, and they are reported
// lost until destroyed. That is also why replaying the writes the dead
// daemon had taken (REISSUE) is safe: no saved chunk remains for a
// replayed write to overwrite. A planned restart (Leave) saves taken
// snapshots instead (leave.go): their members' writes stay paused from
// the save until the next daemon has attached the restored areas, so a
// replayed write meets the restored chunk map and is copied, or not, as
// it would have been.
//
// # Errors
//
// Every error carries an errno: that of the failed system call, or of its
// kind (ErrInvalid EINVAL, ErrNotFound ENOENT, ErrConflict EALREADY,
// ErrBusy EBUSY); Errno finds it.
//
// # Tests
//
// Host tests run the Manager over fakes of the BlockServer and the Host
// (filesystem freezing, who holds a device; package host has the real
// ones) with real files for backings and storage; test/integration runs
// it on ublk in a VM.
package snapshot
