package mirror

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
)

// testRemote returns a valid record of remote c2 for local cluster c1,
// with a CA and client certificate made here.
func testRemote(t testing.TB) Remote {
	t.Helper()
	key := func() *ecdsa.PrivateKey {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	caKey, leafKey := key(), key()
	now := time.Now()
	ca := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "isthmus c2 CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	leaf := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: etcdserver.RemoteUser("c1")},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	leafDER, err := x509.CreateCertificate(rand.Reader, leaf, caCert, &leafKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalECPrivateKey(leafKey)
	return Remote{Version: RemoteVersion, Name: "c2", ClusterID: 2, Endpoints: []string{"https://192.0.2.2:2379"},
		CACert: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})),
		Cert:   string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leafDER})),
		Key:    string(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}))}
}

// FuzzDecodeRemote: the decoder of isthmus/remotes/<c> never panics, and
// what it accepts survives a round trip.
func FuzzDecodeRemote(f *testing.F) {
	good, err := testRemote(f).Marshal("c1")
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte(`{}`))
	f.Add([]byte(`{"version":1,"name":"c2","clusterID":2,"endpoints":["https://a:1"],"caCert":"","cert":"","key":""}`))
	f.Add([]byte(`null`))
	f.Add([]byte(`{"version":1,"name":"c2"} {}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := DecodeRemote(etcdserver.RemoteKey("c2"), data, "c1")
		if err != nil {
			return
		}
		again, err := r.Marshal("c1")
		if err != nil {
			t.Fatalf("accepted record does not marshal: %v", err)
		}
		if back, err := DecodeRemote(etcdserver.RemoteKey("c2"), again, "c1"); err != nil || !back.equal(r) {
			t.Fatalf("round trip: %v", err)
		}
	})
}

// FuzzDecodeStatus: the decoder of isthmus/status/remotes/<c> never
// panics.
func FuzzDecodeStatus(f *testing.F) {
	good, _ := marshalStatus(Status{Cluster: "c2", State: StateConnected, Nodes: 3, LastContact: time.Now()})
	f.Add(good)
	f.Add([]byte(`{"cluster":"C"}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		if s, err := DecodeStatus(data); err == nil && s.Cluster == "" {
			t.Fatal("accepted a status without cluster")
		}
	})
}

func TestTestRemoteIsValid(t *testing.T) {
	r := testRemote(t)
	if err := r.Validate("c1"); err != nil {
		t.Fatal(err)
	}
	if err := r.Validate("c3"); err == nil {
		t.Error("record for user remote-c1 accepted by cluster c3")
	}
	expired := r
	if err := expired.checkCerts("c1", time.Now().Add(2*time.Hour)); err == nil {
		t.Error("expired client certificate accepted")
	}
}
