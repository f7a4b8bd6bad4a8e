package ring

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// ErrUntrusted reports a ring object or a socket peer that does not belong
// to the server this client trusts (spec section 6.1): another user may have
// created the name first to read the requests and forge the replies.
var ErrUntrusted = errors.New("shmserve: not the trusted server's")

// checkOwned applies section 6.1 to an object as fstat or stat saw it: a
// regular file owned by serverUID that no user outside the owner (and, for a
// group-access ring, its group) may open. groupAccess is nil before the
// header has been read: then only "others" must be shut out.
func checkOwned(path string, st *unix.Stat_t, serverUID int, groupAccess *bool) error {
	perm := st.Mode & 0o777
	switch {
	case st.Mode&unix.S_IFMT != unix.S_IFREG:
		return fmt.Errorf("%w: %s is not a regular file", ErrUntrusted, path)
	case int(st.Uid) != serverUID:
		return fmt.Errorf("%w: %s is owned by uid %d, not by the server's uid %d", ErrUntrusted, path, st.Uid, serverUID)
	case perm&0o007 != 0:
		return fmt.Errorf("%w: %s has mode %o: every user may open it", ErrUntrusted, path, perm)
	case groupAccess != nil && !*groupAccess && perm&0o070 != 0:
		return fmt.Errorf("%w: %s has mode %o, but the ring is not group-access", ErrUntrusted, path, perm)
	}
	return nil
}

// checkPath is checkOwned for an object known by its path (a semaphore,
// which sem_open opens by name: sticky /dev/shm keeps other users from
// replacing the server's file once it exists).
func checkPath(path string, serverUID int, groupAccess bool) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return &os.PathError{Op: "lstat", Path: path, Err: err}
	}
	return checkOwned(path, &st, serverUID, &groupAccess)
}
