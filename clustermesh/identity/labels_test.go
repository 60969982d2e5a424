package identity

import (
	"maps"
	"regexp"
	"strings"
	"testing"
)

func TestLabelsString(t *testing.T) {
	tests := []struct {
		name string
		in   Labels
		want string
	}{
		{"nil", nil, ""},
		{"empty", Labels{}, ""},
		{"one", Labels{"app": "web"}, "app=web"},
		{"sorted", Labels{"z": "1", "a": "2", LabelCluster: "c1"}, "a=2,isthmus.io/cluster=c1,z=1"},
		{"empty value", Labels{"flag": ""}, "flag="},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := tt.in.String(); got != tt.want {
				t.Errorf("String() = %q, want %q", got, tt.want)
			}
		})
	}
}

func TestParseLabels(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		want    Labels
		wantErr string
	}{
		{name: "empty", in: "", want: Labels{}},
		{name: "blank", in: "   ", want: Labels{}},
		{name: "one", in: "app=web", want: Labels{"app": "web"}},
		{name: "several", in: "app=web,isthmus.io/cluster=c1", want: Labels{"app": "web", LabelCluster: "c1"}},
		{name: "spaces", in: " app=web , tier=db ", want: Labels{"app": "web", "tier": "db"}},
		{name: "empty value", in: "flag=", want: Labels{"flag": ""}},
		{name: "missing =", in: "app", wantErr: `pair 1 ("app"): want key=value`},
		{name: "empty pair", in: "a=1,,b=2", wantErr: `pair 2 (""): want key=value`},
		{name: "trailing comma", in: "a=1,", wantErr: `pair 2 (""): want key=value`},
		{name: "duplicate", in: "a=1,a=2", wantErr: `key "a" appears more than once`},
		{name: "bad key", in: "-a=1", wantErr: `label key "-a"`},
		{name: "empty key", in: "=1", wantErr: `label key "": name must not be empty`},
		{name: "bad value", in: "a=b c", wantErr: `label value "b c"`},
		{name: "value with =", in: "a=b=c", wantErr: `label value "b=c"`},
		{name: "bad prefix", in: "Foo.io/a=1", wantErr: `prefix`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseLabels(tt.in)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("ParseLabels(%q) error = %v, want containing %q", tt.in, err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("ParseLabels(%q): %v", tt.in, err)
			}
			if !maps.Equal(got, tt.want) {
				t.Errorf("ParseLabels(%q) = %v, want %v", tt.in, got, tt.want)
			}
		})
	}
}

func TestValidateLabelKey(t *testing.T) {
	long63 := strings.Repeat("a", 63)
	tests := []struct {
		key string
		ok  bool
	}{
		{"app", true},
		{"App_Name.v-1", true},
		{"isthmus.io/cluster", true},
		{"a.b-c.example/x", true},
		{long63, true},
		{long63 + "a", false},
		{"example.com/" + long63, true},
		{"example.com/" + long63 + "a", false},
		{strings.Repeat("a.", 126) + "a/x", true}, // prefix of 253 characters
		{strings.Repeat("a.", 127) + "a/x", false},
		{"", false},
		{"/x", false},
		{"x/", false},
		{"a/b/c", false},
		{"_app", false},
		{"app-", false},
		{"UPPER.io/x", false},
		{"ex..com/x", false},
		{"a b", false},
		{"ä", false},
	}
	for _, tt := range tests {
		err := ValidateLabelKey(tt.key)
		if (err == nil) != tt.ok {
			t.Errorf("ValidateLabelKey(%q) = %v, want ok=%v", tt.key, err, tt.ok)
		}
	}
}

func TestValidateLabelValue(t *testing.T) {
	tests := []struct {
		v  string
		ok bool
	}{
		{"", true},
		{"web", true},
		{"1.0", true},
		{"A_b-c.D", true},
		{strings.Repeat("v", 63), true},
		{strings.Repeat("v", 64), false},
		{"-v", false},
		{"v.", false},
		{"a/b", false},
		{"a,b", false},
	}
	for _, tt := range tests {
		err := ValidateLabelValue(tt.v)
		if (err == nil) != tt.ok {
			t.Errorf("ValidateLabelValue(%q) = %v, want ok=%v", tt.v, err, tt.ok)
		}
	}
}

func TestLabelsHas(t *testing.T) {
	l := Labels{"app": "web", "tier": "front", "flag": ""}
	tests := []struct {
		name string
		sel  map[string]string
		want bool
	}{
		{"nil selector", nil, true},
		{"empty selector", map[string]string{}, true},
		{"subset", map[string]string{"app": "web"}, true},
		{"all", map[string]string{"app": "web", "tier": "front", "flag": ""}, true},
		{"empty value present", map[string]string{"flag": ""}, true},
		{"empty value absent key", map[string]string{"other": ""}, false},
		{"wrong value", map[string]string{"app": "db"}, false},
		{"extra key", map[string]string{"app": "web", "zone": "a"}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := l.Has(tt.sel); got != tt.want {
				t.Errorf("Has(%v) = %v, want %v", tt.sel, got, tt.want)
			}
		})
	}
	if !Labels(nil).Has(nil) {
		t.Error("nil labels should match an empty selector")
	}
}

func FuzzParseLabels(f *testing.F) {
	for _, s := range []string{
		"", "app=web", "a=1, b=2", "isthmus.io/cluster=c1,isthmus.io/namespace=default",
		"a", "=", "a=b=c", ",", "a=1,a=1", "x/y=z", " k = v ", "\x00=\xff",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		l, err := ParseLabels(s)
		if err != nil {
			return
		}
		if err := l.Validate(); err != nil {
			t.Fatalf("ParseLabels(%q) accepted invalid labels: %v", s, err)
		}
		str := l.String()
		back, err := ParseLabels(str)
		if err != nil {
			t.Fatalf("ParseLabels(String()) of %q = %q: %v", s, str, err)
		}
		if !maps.Equal(l, back) {
			t.Fatalf("round trip of %q: %v != %v", s, l, back)
		}
		if back.String() != str {
			t.Fatalf("String not stable: %q != %q", back.String(), str)
		}
	})
}

// The hand-written matchers accept exactly what the patterns they
// replaced accept: every string of up to four bytes over an alphabet
// with a byte of each class (end, inner only, outside), and the fuzzer's.
func TestNameMatchersMatchPatterns(t *testing.T) {
	alphabet := []byte("aZ09-_.A/ \xff")
	var gen func(prefix []byte, n int)
	gen = func(prefix []byte, n int) {
		checkNameMatchers(t, string(prefix))
		if n == 0 {
			return
		}
		for _, c := range alphabet {
			gen(append(prefix, c), n-1)
		}
	}
	gen(nil, 4)
}

func FuzzNameMatchers(f *testing.F) {
	for _, s := range []string{"", "a", "a-b", "-a", "a.", "A_b.c", "app.kubernetes.io"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) { checkNameMatchers(t, s) })
}

// The patterns the matchers replaced.
var (
	labelNamePattern = regexp.MustCompile(`^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$`)
	dnsLabelPattern  = regexp.MustCompile(`^[a-z0-9]([-a-z0-9]*[a-z0-9])?$`)
)

func checkNameMatchers(t *testing.T, s string) {
	t.Helper()
	if got, want := isLabelName(s), labelNamePattern.MatchString(s); got != want {
		t.Fatalf("isLabelName(%q) = %v, the pattern says %v", s, got, want)
	}
	if got, want := IsDNSLabel(s), dnsLabelPattern.MatchString(s); got != want {
		t.Fatalf("IsDNSLabel(%q) = %v, the pattern says %v", s, got, want)
	}
}
