package crds

import (
	"strings"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/yaml"
)

func TestAll(t *testing.T) {
	all := All()
	if len(all) == 0 {
		t.Fatal("no CRDs embedded")
	}
	plurals := map[string]bool{}
	for i, b := range all {
		var obj map[string]any
		if err := yaml.UnmarshalStrict(b, &obj); err != nil {
			t.Fatalf("CRD %d: %v", i, err)
		}
		u := unstructured.Unstructured{Object: obj}
		if u.GetAPIVersion() != "apiextensions.k8s.io/v1" || u.GetKind() != "CustomResourceDefinition" {
			t.Fatalf("CRD %d: %s %s, want apiextensions.k8s.io/v1 CustomResourceDefinition", i, u.GetAPIVersion(), u.GetKind())
		}
		group, _, _ := unstructured.NestedString(obj, "spec", "group")
		if group != "isthmus.io" && group != "multicluster.x-k8s.io" {
			t.Errorf("%s: group %q", u.GetName(), group)
		}
		plural, _, _ := unstructured.NestedString(obj, "spec", "names", "plural")
		plurals[plural] = true
		if u.GetName() != plural+"."+group {
			t.Errorf("name %q, want %q", u.GetName(), plural+"."+group)
		}
		// ServiceExport has no spec (its name is the Service's).
		specless := u.GetName() == "serviceexports.multicluster.x-k8s.io"
		versions, _, _ := unstructured.NestedSlice(obj, "spec", "versions")
		if len(versions) == 0 {
			t.Fatalf("%s: no versions", u.GetName())
		}
		for _, v := range versions {
			vm := v.(map[string]any)
			if _, ok, _ := unstructured.NestedMap(vm, "subresources", "status"); !ok {
				t.Errorf("%s %v: no status subresource", u.GetName(), vm["name"])
			}
			if _, ok, _ := unstructured.NestedMap(vm, "schema", "openAPIV3Schema", "properties", "spec"); !ok && !specless {
				t.Errorf("%s %v: no spec schema", u.GetName(), vm["name"])
			}
		}
	}
	for _, p := range []string{"networkpolicies", "loadbalancerippools", "bgppeeringpolicies", "l2announcementpolicies", "externalworkloads", "serviceexports", "serviceimports"} {
		if !plurals[p] {
			t.Errorf("no %s CRD among %v", p, plurals)
		}
	}
}

// gofmt rewrites two apostrophes (an empty CEL string) and two backquotes
// in doc comments as typographic quotes, which
// would turn a CEL rule of a kubebuilder marker into one the API server
// refuses: the markers must not hold them.
func TestNoTypographicQuotes(t *testing.T) {
	for i, b := range All() {
		if s := string(b); strings.ContainsAny(s, "\u201c\u201d") {
			t.Errorf("CRD %d holds a typographic quote (a marker with '' or `` that gofmt rewrote): write the rule without them", i)
		}
	}
}
