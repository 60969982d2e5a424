package l2

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"testing"
)

func TestHeartbeatSignatures(t *testing.T) {
	pub, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	otherPub, otherKey, _ := ed25519.GenerateKey(rand.Reader)
	m := Member{Node: "n1"}
	b, err := encodeHeartbeat("c1", m, 7, key)
	if err != nil {
		t.Fatal(err)
	}
	hb, payload, sig, err := decodeHeartbeat(b)
	if err != nil || hb.Node != "n1" || hb.Cluster != "c1" || hb.Seq != 7 || payload == nil {
		t.Fatalf("decode: %+v %v", hb, err)
	}
	if err := verifyHeartbeat(hb, payload, sig, pub, 6); err != nil {
		t.Fatalf("a good heartbeat: %v", err)
	}

	// Each of these must be refused.
	if err := verifyHeartbeat(hb, payload, sig, pub, 7); err == nil {
		t.Error("a replayed heartbeat (same sequence number) was accepted")
	}
	if err := verifyHeartbeat(hb, payload, sig, otherPub, 0); err == nil {
		t.Error("a heartbeat verified with another node's key")
	}
	forged, _ := encodeHeartbeat("c1", m, 8, otherKey) // signed by someone else, naming n1
	fhb, fp, fs, _ := decodeHeartbeat(forged)
	if err := verifyHeartbeat(fhb, fp, fs, pub, 7); err == nil {
		t.Error("a heartbeat signed with another key was accepted for n1")
	}
	tampered := bytes.Replace(payload, []byte(`"seq":7`), []byte(`"seq":9`), 1)
	thb, _, _, _ := decodeHeartbeat(mustJSON(t, signedHeartbeat{Payload: tampered, Sig: sig}))
	if err := verifyHeartbeat(thb, tampered, sig, pub, 7); err == nil {
		t.Error("a heartbeat whose payload was changed after signing was accepted")
	}
	unsigned := mustJSON(t, heartbeat{V: unsignedHeartbeatVersion, Cluster: "c1", Member: m})
	uhb, up, us, err := decodeHeartbeat(unsigned)
	if err != nil || up != nil {
		t.Fatalf("unsigned: %v %v", up, err)
	}
	if err := verifyHeartbeat(uhb, up, us, pub, 0); err == nil {
		t.Error("an unsigned heartbeat was accepted for a node that publishes a key")
	}
	// A record without a key (an agent of the earlier version) is heard
	// unsigned, as before.
	if err := verifyHeartbeat(uhb, up, us, nil, 0); err != nil {
		t.Errorf("an unsigned heartbeat of a keyless record: %v", err)
	}
	if _, _, _, err := decodeHeartbeat([]byte(`{"v":3,"cluster":"c1","node":"n1"}`)); err == nil {
		t.Error("a heartbeat of an unknown version decoded")
	}
}

func mustJSON(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
