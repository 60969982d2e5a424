package translate

import (
	"maps"
	"strings"
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/identity"
)

func TestNamespaceLabelKey(t *testing.T) {
	long := strings.Repeat("a", 63)
	fits := strings.Join([]string{long, long, long, strings.Repeat("b", 253-3*64-len(".ns.isthmus.io"))}, ".")
	tests := []struct{ in, want string }{
		{"team", "ns.isthmus.io/team"},
		{"kubernetes.io/metadata.name", "kubernetes.io.ns.isthmus.io/metadata.name"},
		{"example.com/tier", "example.com.ns.isthmus.io/tier"},
		{"isthmus.io/x", "isthmus.io.ns.isthmus.io/x"},
		{long, "ns.isthmus.io/" + long},
		{fits + "/n", fits + ".ns.isthmus.io/n"}, // prefix of exactly 253 after mapping
		{fits + "b/n", ""},                       // 254: does not fit
		{strings.Repeat("c", 250) + "/n", ""},    // valid key, too long once mapped
		{"", ""},                                 // invalid keys
		{"a/b/c", ""},
		{"-x", ""},
	}
	for _, tt := range tests {
		got := NamespaceLabelKey(tt.in)
		if got != tt.want {
			t.Errorf("NamespaceLabelKey(%q) = %q, want %q", tt.in, got, tt.want)
		}
		if got != "" {
			if err := identity.ValidateLabelKey(got); err != nil {
				t.Errorf("NamespaceLabelKey(%q) = %q: %v", tt.in, got, err)
			}
		}
	}
}

func TestPodLabels(t *testing.T) {
	tooLong := strings.Repeat("d", 245) + "/x"
	got, warnings := PodLabels(
		map[string]string{
			"app":                  "web",
			"example.com/tier":     "front",
			"isthmus.io/namespace": "other", // reserved: must not override
			"x.isthmus.io/y":       "z",     // reserved, also the namespace labels' domain
			"notisthmus.io/ok":     "kept",  // not the reserved domain
			"isthmus.io.example/k": "kept",  // neither
		},
		map[string]string{
			"kubernetes.io/metadata.name": "shop",
			"team":                        "a",
			tooLong:                       "v",
		})
	want := map[string]string{
		"app":                  "web",
		"example.com/tier":     "front",
		"notisthmus.io/ok":     "kept",
		"isthmus.io.example/k": "kept",
		"kubernetes.io.ns.isthmus.io/metadata.name": "shop",
		"ns.isthmus.io/team":                        "a",
	}
	if !maps.Equal(got, want) {
		t.Errorf("labels:\n got %v\nwant %v", got, want)
	}
	if len(warnings) != 3 ||
		!strings.Contains(warnings[0], `pod label "isthmus.io/namespace" dropped`) ||
		!strings.Contains(warnings[1], `pod label "x.isthmus.io/y" dropped`) ||
		!strings.Contains(warnings[2], `namespace label "`+tooLong+`" dropped`) {
		t.Errorf("warnings: %q", warnings)
	}
	if err := identity.Labels(got).Validate(); err != nil {
		t.Error(err)
	}
	if l, w := PodLabels(nil, nil); len(l) != 0 || w != nil {
		t.Errorf("PodLabels(nil, nil) = %v, %v", l, w)
	}
}
