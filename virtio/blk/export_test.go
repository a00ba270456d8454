package blk

// SetTestHookDeferring sets a function run when a worker decides to leave
// the interrupt for its completion to another worker; nil removes it.
func SetTestHookDeferring(f func()) { testHookDeferring = f }
