//go:build !(invariants || race)

package cow

// invariantsEnabled turns on the state-transition assertions; it is set in
// builds with the invariants tag and under the race detector.
const invariantsEnabled = false
