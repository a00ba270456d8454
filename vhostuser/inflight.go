package vhostuser

// inflightRing is one ring's queue region of the in-flight area
// (INFLIGHT_SHMFD, vhost-user.rst "Inflight I/O tracking").
type inflightRing struct{}
