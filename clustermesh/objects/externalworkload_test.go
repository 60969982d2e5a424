package objects

import (
	"strings"
	"testing"
)

func TestDecodeExternalWorkload(t *testing.T) {
	w, err := DecodeExternalWorkload([]byte(`apiVersion: isthmus.io/v1alpha1
kind: ExternalWorkload
metadata: {name: db1, labels: {app: db}}
spec: {ipv4: 10.1.200.5, ipv6: "fd00:1:0:c8::5"}
status: {enrolled: true}
`))
	if err != nil {
		t.Fatal(err)
	}
	if w.Metadata.Namespace != "default" || w.Status.Enrolled || w.Metadata.Labels["app"] != "db" {
		t.Fatalf("decoded %+v: want namespace defaulted and the status dropped", w)
	}
	bad := map[string]string{
		"unknown field":  "metadata: {name: db1}\nspec: {ipv4: 10.1.200.5, port: 5}",
		"wrong family":   "metadata: {name: db1}\nspec: {ipv4: \"fd00::1\"}",
		"not an address": "metadata: {name: db1}\nspec: {ipv6: nope}",
		"bad name":       "metadata: {name: DB_1}",
		"bad label":      "metadata: {name: db1, labels: {\"a b\": x}}",
		"name too long":  "metadata: {name: " + strings.Repeat("a", 61) + "}",
		"label number":   "metadata: {name: db1, labels: {v: 1.0}}",
	}
	for name, body := range bad {
		if _, err := DecodeExternalWorkload([]byte("apiVersion: isthmus.io/v1alpha1\nkind: ExternalWorkload\n" + body)); err == nil {
			t.Errorf("%s: decoded without error", name)
		}
	}
	if _, err := DecodeExternalWorkload([]byte("apiVersion: isthmus.io/v1alpha1\nkind: Service\nmetadata: {name: x}")); err == nil {
		t.Error("a Service decoded as an ExternalWorkload")
	}
	if _, err := DecodeExternalWorkload([]byte("apiVersion: isthmus.io/v1alpha1\nkind: ExternalWorkload\nmetadata: {name: a}\n---\napiVersion: isthmus.io/v1alpha1\nkind: ExternalWorkload\nmetadata: {name: b}")); err == nil {
		t.Error("two objects decoded as one")
	}
}
