package l2

import (
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"net"
	"net/netip"
)

// heartbeat is what a candidate sends every HeartbeatInterval to the other
// nodes of its cluster: it is alive, holds its lease, and may lead these.
// A node that stops sending (killed, its interface down, its lease lost)
// is dead to the others after DeadAfter.
//
// Heartbeats are signed: each agent makes an Ed25519 key pair when it
// starts and publishes the public key in its L2 record, which only its own
// etcd credential can write. A heartbeat counts only when its signature
// verifies with the key of the node it names and its sequence number is
// above the last one counted from that node, so neither a host on the
// segment nor another node of the cluster (which can read the records but
// not the private keys) can keep a dead node alive or replay a living
// one's heartbeats. Records without a key (agents of an earlier version,
// during a rolling update) are heard unsigned, as before.
type heartbeat struct {
	V       int    `json:"v"`
	Cluster string `json:"cluster"`
	Seq     uint64 `json:"seq,omitempty"`
	Member
}

// signedHeartbeat is the datagram: the heartbeat's JSON and its signature.
type signedHeartbeat struct {
	Payload []byte `json:"p"`
	Sig     []byte `json:"s"`
}

const (
	heartbeatVersion         = 2
	unsignedHeartbeatVersion = 1
)

// maxHeartbeat bounds a datagram (and so the policies and Local services
// a heartbeat can list).
const maxHeartbeat = 60000

var errBadSignature = errors.New("heartbeat signature does not verify")

// encodeHeartbeat signs m's heartbeat with key.
func encodeHeartbeat(cluster string, m Member, seq uint64, key ed25519.PrivateKey) ([]byte, error) {
	p, err := json.Marshal(heartbeat{V: heartbeatVersion, Cluster: cluster, Seq: seq, Member: m})
	if err != nil {
		return nil, err
	}
	return json.Marshal(signedHeartbeat{Payload: p, Sig: ed25519.Sign(key, p)})
}

// listenHeartbeats opens the UDP socket heartbeats come in on (and go out
// from), dual-stack.
func listenHeartbeats(port int) (*net.UDPConn, error) {
	return net.ListenUDP("udp", &net.UDPAddr{Port: port})
}

// decodeHeartbeat parses a datagram: a signed heartbeat (signed true, its
// signature not checked yet: verifyHeartbeat does, with the sender's key)
// or an unsigned one of an earlier version.
func decodeHeartbeat(b []byte) (hb heartbeat, payload, sig []byte, err error) {
	var s signedHeartbeat
	if err := json.Unmarshal(b, &s); err == nil && len(s.Payload) > 0 {
		if err := json.Unmarshal(s.Payload, &hb); err != nil {
			return heartbeat{}, nil, nil, err
		}
		if hb.V != heartbeatVersion {
			return heartbeat{}, nil, nil, errors.New("signed heartbeat of an unknown version")
		}
		return hb, s.Payload, s.Sig, nil
	}
	if err := json.Unmarshal(b, &hb); err != nil {
		return heartbeat{}, nil, nil, err
	}
	if hb.V != unsignedHeartbeatVersion {
		return heartbeat{}, nil, nil, errors.New("heartbeat of an unknown version")
	}
	return hb, nil, nil, nil
}

// verifyHeartbeat checks a decoded heartbeat against its sender's
// published key (nil: a record of an earlier version, heard unsigned) and
// the last sequence number counted from it.
func verifyHeartbeat(hb heartbeat, payload, sig []byte, key ed25519.PublicKey, lastSeq uint64) error {
	if len(key) == 0 {
		return nil
	}
	if payload == nil || len(key) != ed25519.PublicKeySize || !ed25519.Verify(key, payload, sig) {
		return errBadSignature
	}
	if hb.Seq <= lastSeq {
		return errors.New("heartbeat replayed or out of order")
	}
	return nil
}

func unmap(a netip.Addr) netip.Addr { return a.Unmap() }
