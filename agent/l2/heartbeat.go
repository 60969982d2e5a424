package l2

import (
	"encoding/json"
	"net"
	"net/netip"
)

// heartbeat is what a candidate sends every HeartbeatInterval to the other
// nodes of its cluster: it is alive, holds its lease, and may lead these.
// A node that stops sending (killed, its interface down, its lease lost)
// is dead to the others after DeadAfter.
type heartbeat struct {
	V       int    `json:"v"`
	Cluster string `json:"cluster"`
	Member
}

const heartbeatVersion = 1

// maxHeartbeat bounds a datagram (and so the policies and Local services
// a heartbeat can list).
const maxHeartbeat = 60000

func encodeHeartbeat(cluster string, m Member) ([]byte, error) {
	return json.Marshal(heartbeat{V: heartbeatVersion, Cluster: cluster, Member: m})
}

// listenHeartbeats opens the UDP socket heartbeats come in on (and go out
// from), dual-stack.
func listenHeartbeats(port int) (*net.UDPConn, error) {
	return net.ListenUDP("udp", &net.UDPAddr{Port: port})
}

// decodeHeartbeat parses a datagram from src, which must be one of the
// sender's published addresses (checked by the caller).
func decodeHeartbeat(b []byte) (heartbeat, error) {
	var hb heartbeat
	err := json.Unmarshal(b, &hb)
	return hb, err
}

func unmap(a netip.Addr) netip.Addr { return a.Unmap() }
