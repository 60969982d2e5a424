package objects

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
)

// benchServiceYAML is a service as tests/bench/bgp.go applies it.
func benchServiceYAML(i int) string {
	return fmt.Sprintf(`apiVersion: isthmus.io/v1alpha1
kind: Service
metadata: {name: vip-%05d}
spec:
  type: LoadBalancer
  vips: [10.98.%d.%d]
  ports: [{port: 80, targetPort: 8080}]
  selector: {app: vip-%05d}
`, i, i>>8&255, i&255, i)
}

// BenchmarkDecodeYAML1000 decodes what one apply of the bgp benchmark
// sends: 1,000 services in one multi-document YAML stream.
func BenchmarkDecodeYAML1000(b *testing.B) {
	var sb strings.Builder
	for i := range 1000 {
		sb.WriteString(benchServiceYAML(i))
		sb.WriteString("---\n")
	}
	in := []byte(sb.String())
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decode(in); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkDecodeStored decodes a service as it is stored (etcd, state
// files): the JSON encoding of the decoded object.
func BenchmarkDecodeStored(b *testing.B) {
	objs, err := Decode([]byte(benchServiceYAML(1)))
	if err != nil {
		b.Fatal(err)
	}
	in, err := json.Marshal(objs[0])
	if err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Decode(in); err != nil {
			b.Fatal(err)
		}
	}
}
