// Package state persists the agent's desired state in its state directory:
// the endpoints it created and the objects (Service, NetworkPolicy) applied to
// it. Every change is written to disk before the agent touches the kernel, so
// a restarted agent rebuilds exactly what it had promised.
//
// Files are JSON, written atomically (temporary file, fsync, rename, fsync of
// the directory) with mode 0600. A file that does not parse stops the agent
// with an error naming the file, instead of being silently replaced.
package state
