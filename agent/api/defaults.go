package api

import (
	"os"
	"path/filepath"
	"strings"
)

// SocketDir holds the API sockets of the agents of this machine, one per node.
const SocketDir = "/var/run/isthmus"

// DefaultNodeName is the node name an agent uses unless told otherwise: the
// first label of the host name, lower-cased.
func DefaultNodeName() string {
	h, err := os.Hostname()
	if err != nil || h == "" {
		return "node"
	}
	h, _, _ = strings.Cut(h, ".")
	return strings.ToLower(h)
}

// DefaultSocketPath is where the agent of node listens unless told otherwise.
func DefaultSocketPath(node string) string {
	return filepath.Join(SocketDir, node+".sock")
}
