package objects

import (
	"bytes"
	"encoding"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"unicode/utf8"

	yamlv2 "go.yaml.in/yaml/v2"
	"sigs.k8s.io/yaml"
)

// Decode parses a multi-document YAML stream (documents separated by lines
// that are "---", optionally followed by blanks, a comment or content) into
// *Service, *NetworkPolicy, *LoadBalancerIPPool, *BGPPeeringPolicy and
// *L2AnnouncementPolicy values, defaulted and
// validated.
//
// It is strict: unknown fields, duplicate keys, values of the wrong type
// (label values must be strings: quote `1.0` or `true`), an unknown kind or
// apiVersion, and input without any object are errors. Empty documents are
// skipped. One bad document fails the whole call.
func Decode(data []byte) ([]Object, error) {
	var out []Object
	n := 0
	for _, doc := range splitDocuments(data) {
		if o, ok := decodeCanonical(doc.text); ok {
			n++
			out = append(out, o)
			continue
		}
		raw, err := yamlToGeneric(doc.text)
		if err == nil && raw == nil {
			continue // empty document: blank, comments only, or null
		}
		n++
		if err != nil {
			return nil, fmt.Errorf("document %d (line %d): %w", n, doc.line, err)
		}
		o, err := decodeObject(raw)
		if err != nil {
			return nil, fmt.Errorf("document %d%s: %w", n, describe(raw), err)
		}
		out = append(out, o)
	}
	if n == 0 {
		return nil, errors.New("no objects found in input")
	}
	return out, nil
}

type document struct {
	text []byte
	line int // 1-based line of the document's first line in the input
}

// splitDocuments cuts the input at document markers. A line is a marker
// when it is "---" (or "...") followed by nothing, blanks, or blanks and
// more text; the text after "--- " belongs to the next document. The YAML
// library reads only the first document of what it is given, so a marker
// missed here would silently drop objects.
func splitDocuments(data []byte) []document {
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf")) // UTF-8 BOM
	var docs []document
	var cur bytes.Buffer
	start := 1
	lines := bytes.SplitAfter(data, []byte("\n"))
	for i, line := range lines {
		rest, ok := cutMarker(line)
		if !ok {
			cur.Write(line)
			continue
		}
		docs = append(docs, document{text: bytes.Clone(cur.Bytes()), line: start})
		cur.Reset()
		start = i + 1
		if len(bytes.TrimSpace(rest)) > 0 && rest[0] != '#' {
			cur.Write(rest)
		} else {
			start = i + 2
		}
	}
	return append(docs, document{text: cur.Bytes(), line: start})
}

// cutMarker reports whether line is a document marker and returns the text
// that follows it (without the separating blanks).
func cutMarker(line []byte) ([]byte, bool) {
	for _, m := range [][]byte{[]byte("---"), []byte("...")} {
		rest, ok := bytes.CutPrefix(line, m)
		if !ok {
			continue
		}
		if len(rest) == 0 || rest[0] == '\n' || rest[0] == '\r' {
			return nil, true
		}
		if rest[0] == ' ' || rest[0] == '\t' {
			return bytes.TrimLeft(rest, " \t"), true
		}
	}
	return nil, false
}

// yamlToGeneric converts one YAML document into JSON-like Go values
// (map[string]any, []any, string, json.Number, bool, nil). Duplicate keys
// are an error.
func yamlToGeneric(doc []byte) (any, error) {
	if v, ok := jsonToGeneric(doc); ok {
		return v, nil
	}
	if v, ok := parseSimpleYAML(doc); ok {
		return v, nil
	}
	return yamlToGenericViaLibrary(doc)
}

// yamlToGenericViaLibrary is yamlToGeneric through the YAML library.
func yamlToGenericViaLibrary(doc []byte) (any, error) {
	var y any
	if err := yamlv2.UnmarshalStrict(doc, &y); err != nil {
		return nil, err // what YAMLToJSONStrict returns
	}
	if v, ok := genericOfYAML(y); ok {
		return v, nil
	}
	return yamlToGenericViaJSON(doc)
}

// yamlToGenericViaJSON is yamlToGeneric through JSON text, as
// sigs.k8s.io/yaml converts YAML: it decides what genericOfYAML does not
// take.
func yamlToGenericViaJSON(doc []byte) (any, error) {
	js, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.UseNumber()
	var v any
	if err := dec.Decode(&v); err != nil {
		return nil, fmt.Errorf("converting YAML: %w", err)
	}
	return v, nil
}

// genericOfYAML converts what the YAML library decoded into the values
// yamlToGenericViaJSON gives for it (sigs.k8s.io/yaml's conversion,
// encoding/json's text, decoded with numbers as json.Number), without the
// text: for the types it knows exactly (mappings with string, integer or
// boolean keys, lists, strings of valid UTF-8, integers, booleans, null);
// anything else (floats, keys that convert to the same string) says !ok.
// A bulk apply is a thousand YAML documents, and the JSON text cost about
// a fifth of their decoding.
func genericOfYAML(y any) (any, bool) {
	switch v := y.(type) {
	case nil, bool:
		return v, true
	case string:
		return v, utf8.ValidString(v) // encoding/json would replace bad bytes
	case int:
		return json.Number(strconv.Itoa(v)), true
	case int64:
		return json.Number(strconv.FormatInt(v, 10)), true
	case uint64:
		return json.Number(strconv.FormatUint(v, 10)), true
	case []any:
		out := make([]any, len(v))
		for i, e := range v {
			g, ok := genericOfYAML(e)
			if !ok {
				return nil, false
			}
			out[i] = g
		}
		return out, true
	case map[any]any:
		out := make(map[string]any, len(v))
		for k, e := range v {
			var key string
			switch k := k.(type) {
			case string:
				key = k
			case int:
				key = strconv.Itoa(k)
			case int64:
				key = strconv.FormatInt(k, 10)
			case bool:
				key = strconv.FormatBool(k)
			default:
				return nil, false
			}
			if _, dup := out[key]; dup || !utf8.ValidString(key) {
				return nil, false
			}
			g, ok := genericOfYAML(e)
			if !ok {
				return nil, false
			}
			out[key] = g
		}
		return out, true
	}
	return nil, false
}

// jsonToGeneric is the fast path for a document that is one JSON object,
// as Isthmus stores objects (etcd, state files) and `get -o json` prints
// them: the YAML library costs about ten times as much, which matters
// when a server or agent decodes ten thousand stored services. It gives
// what the YAML path gives for such input (numbers as json.Number) and
// says !ok for anything it does not take exactly, duplicate keys and
// trailing data included, so the YAML path decides those, with its
// errors.
func jsonToGeneric(doc []byte) (any, bool) {
	t := bytes.TrimSpace(doc)
	if len(t) == 0 || t[0] != '{' {
		return nil, false
	}
	dec := json.NewDecoder(bytes.NewReader(t))
	dec.UseNumber()
	v, ok := jsonValue(dec)
	if !ok {
		return nil, false
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, false
	}
	return v, true
}

// jsonValue reads one value token by token, refusing duplicate keys.
func jsonValue(dec *json.Decoder) (any, bool) {
	tok, err := dec.Token()
	if err != nil {
		return nil, false
	}
	switch d := tok.(type) {
	case json.Delim:
		switch d {
		case '{':
			m := map[string]any{}
			for dec.More() {
				kt, err := dec.Token()
				k, isKey := kt.(string)
				if err != nil || !isKey {
					return nil, false
				}
				if _, dup := m[k]; dup {
					return nil, false
				}
				v, ok := jsonValue(dec)
				if !ok {
					return nil, false
				}
				m[k] = v
			}
			if end, err := dec.Token(); err != nil || end != json.Delim('}') {
				return nil, false
			}
			return m, true
		case '[':
			l := []any{}
			for dec.More() {
				v, ok := jsonValue(dec)
				if !ok {
					return nil, false
				}
				l = append(l, v)
			}
			if end, err := dec.Token(); err != nil || end != json.Delim(']') {
				return nil, false
			}
			return l, true
		}
		return nil, false
	default:
		return tok, true // string, json.Number, bool or nil
	}
}

// describe returns " (Kind namespace/name)" for error messages, with as
// much as the raw document tells.
func describe(raw any) string {
	m, _ := raw.(map[string]any)
	kind, _ := m["kind"].(string)
	meta, _ := m["metadata"].(map[string]any)
	name, _ := meta["name"].(string)
	ns, _ := meta["namespace"].(string)
	var parts []string
	if kind != "" {
		parts = append(parts, kind)
	}
	if name != "" {
		parts = append(parts, namespaceOrDefault(ns)+"/"+name)
	}
	if len(parts) == 0 {
		return ""
	}
	return " (" + strings.Join(parts, " ") + ")"
}

// canonicalPrefix starts the JSON encoding of every kind (its first fields
// are apiVersion and kind).
var canonicalPrefix = []byte(`{"apiVersion":"` + APIVersion + `","kind":"`)

// decodeCanonical is the fast path for a document that is exactly the
// JSON encoding (json.Marshal) of an object of a known kind: what
// Isthmus stores (etcd, state files) and what each agent's watch and the
// server decode, ten thousand times in a bulk apply. The generic path
// (tokens, shape check, encoding again, decoding) cost about ten times
// as much. The document is decoded straight into its type, and taken
// only if encoding the result gives the document back byte for byte:
// that rules out what the typed decoder would let through and the
// generic path refuses (unknown, duplicate or differently cased keys,
// invalid UTF-8, numbers where strings go), so the generic path would
// have decoded the same fields to the same values. Anything else, and
// an object that does not validate, is left to the generic path and its
// errors (ok false).
func decodeCanonical(doc []byte) (Object, bool) {
	t := bytes.TrimSpace(doc)
	rest, ok := bytes.CutPrefix(t, canonicalPrefix)
	if !ok {
		return nil, false
	}
	kind, _, ok := bytes.Cut(rest, []byte{'"'})
	if !ok {
		return nil, false
	}
	obj := newObject(string(kind))
	if obj == nil || json.Unmarshal(t, obj) != nil {
		return nil, false
	}
	if enc, err := json.Marshal(obj); err != nil || !bytes.Equal(enc, t) {
		return nil, false
	}
	obj.defaultNamespace()
	if obj.Validate() != nil {
		return nil, false
	}
	obj.normalize()
	return obj, true
}

// decodable is an object Decode makes: it defaults and normalizes itself.
type decodable interface {
	Object
	defaultNamespace()
	normalize()
}

// newObject returns a new, empty object of kind, or nil for a kind
// Decode does not know.
func newObject(kind string) decodable {
	switch kind {
	case KindService:
		return &Service{}
	case KindNetworkPolicy:
		return &NetworkPolicy{}
	case KindLoadBalancerIPPool:
		return &LoadBalancerIPPool{}
	case KindBGPPeeringPolicy:
		return &BGPPeeringPolicy{}
	case KindL2AnnouncementPolicy:
		return &L2AnnouncementPolicy{}
	}
	return nil
}

// kindList names the kinds Decode knows, for error messages.
var kindList = strings.Join([]string{KindService, KindNetworkPolicy, KindLoadBalancerIPPool, KindBGPPeeringPolicy, KindL2AnnouncementPolicy}, ", ")

func decodeObject(raw any) (Object, error) {
	m, ok := raw.(map[string]any)
	if !ok {
		return nil, fmt.Errorf("must be a mapping with apiVersion, kind, metadata and spec, got %s", describeValue(raw))
	}
	switch v := m["apiVersion"].(type) {
	case nil:
		return nil, fieldError("apiVersion", "required, must be %q", APIVersion)
	case string:
		if v != APIVersion {
			return nil, fieldError("apiVersion", "must be %q, got %q", APIVersion, v)
		}
	default:
		return nil, fieldError("apiVersion", "must be %q, got %s", APIVersion, describeValue(v))
	}

	var obj decodable
	switch kind := m["kind"].(type) {
	case nil:
		return nil, fieldError("kind", "required, must be %s", kindList)
	case string:
		if obj = newObject(kind); obj == nil {
			return nil, fieldError("kind", "unknown kind %q, must be %s", kind, kindList)
		}
	default:
		return nil, fieldError("kind", "must be %s, got %s", kindList, describeValue(kind))
	}

	// The generic value goes into the typed object directly; only when
	// that finds something it does not take does the slower way below
	// decide, with its errors.
	if !assignGeneric(raw, reflect.ValueOf(obj).Elem()) {
		obj = newObject(obj.GetKind())
		if err := decodeGeneric(raw, obj); err != nil {
			return nil, err
		}
	}
	// Validate accepts any case and an empty namespace would fail, so set
	// the namespace first and upper-case protocols after: errors then show
	// the value as the user wrote it.
	obj.defaultNamespace()
	if err := obj.Validate(); err != nil {
		return nil, err
	}
	obj.normalize()
	return obj, nil
}

// decodeGeneric decodes a generic value into obj the way encoding/json
// does, after a check of its shape against obj's type.
func decodeGeneric(raw any, obj Object) error {
	// checkShape gives errors with the full field path; encoding/json's own
	// errors do not name list indexes or the unknown field's position.
	if err := checkShape(raw, reflect.TypeOf(obj).Elem(), ""); err != nil {
		return err
	}
	js, err := json.Marshal(raw)
	if err != nil {
		return err
	}
	dec := json.NewDecoder(bytes.NewReader(js))
	dec.DisallowUnknownFields()
	return dec.Decode(obj) // checkShape should have caught it; keep the safety net
}

// checkShape compares a generic JSON value with the Go type it will be
// decoded into: no unknown (or differently cased) fields, strings where
// strings go, integers in range where integers go. null is accepted
// anywhere and leaves the zero value.
func checkShape(v any, t reflect.Type, path string) error {
	if v == nil {
		return nil
	}
	at := func(p string) string {
		if p == "" {
			return "document"
		}
		return p
	}
	switch t.Kind() {
	case reflect.Struct:
		m, ok := v.(map[string]any)
		if !ok {
			return fieldError(at(path), "must be a mapping, got %s", describeValue(v))
		}
		fields := jsonFields(t)
		for _, k := range slices.Sorted(maps.Keys(m)) {
			child := joinPath(path, k)
			f, ok := fields[k]
			if !ok {
				return fieldError(child, "unknown field")
			}
			if err := checkShape(m[k], f.Type, child); err != nil {
				return err
			}
		}
	case reflect.Map:
		m, ok := v.(map[string]any)
		if !ok {
			return fieldError(at(path), "must be a mapping, got %s", describeValue(v))
		}
		for _, k := range slices.Sorted(maps.Keys(m)) {
			if err := checkShape(m[k], t.Elem(), fmt.Sprintf("%s[%q]", path, k)); err != nil {
				return err
			}
		}
	case reflect.Slice:
		s, ok := v.([]any)
		if !ok {
			return fieldError(at(path), "must be a list, got %s", describeValue(v))
		}
		for i, e := range s {
			if err := checkShape(e, t.Elem(), fmt.Sprintf("%s[%d]", path, i)); err != nil {
				return err
			}
		}
	case reflect.Pointer:
		return checkShape(v, t.Elem(), path)
	case reflect.Bool:
		if _, ok := v.(bool); !ok {
			return fieldError(at(path), "must be true or false, got %s", describeValue(v))
		}
	case reflect.String:
		if _, ok := v.(string); !ok {
			return fieldError(at(path), "must be a string, got %s (quote it)", describeValue(v))
		}
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		num, ok := v.(json.Number)
		if !ok {
			return fieldError(at(path), "must be a number, got %s", describeValue(v))
		}
		if _, err := strconv.ParseUint(num.String(), 10, t.Bits()); err != nil {
			return fieldError(at(path), "must be an integer 0-%d, got %s", uint64(1)<<t.Bits()-1, num)
		}
	}
	return nil
}

// assignGeneric sets v (a zero value) from a generic value as
// decodeGeneric would, for what checkShape accepts and encoding/json
// decodes without a method of the type: objects into structs (exact field
// names) and maps of strings, lists, strings, booleans, integers in range,
// null as nothing (no ",string" fields). It reports false at the first thing it does not take
// (v is then half set); decoding a bulk apply's ten thousand services
// through JSON text again cost three times as much as this.
func assignGeneric(raw any, v reflect.Value) bool {
	if raw == nil {
		return true // encoding/json leaves the zero value
	}
	if pt := reflect.PointerTo(v.Type()); pt.Implements(jsonUnmarshaler) || pt.Implements(textUnmarshaler) {
		return false
	}
	switch v.Kind() {
	case reflect.Struct:
		m, ok := raw.(map[string]any)
		if !ok {
			return false
		}
		fields := jsonFields(v.Type())
		for k, e := range m {
			f, ok := fields[k]
			if !ok || strings.Contains(string(f.Tag), ",string") || !assignGeneric(e, v.Field(f.Index[0])) {
				return false
			}
		}
	case reflect.Map:
		m, ok := raw.(map[string]any)
		if !ok || v.Type().Key().Kind() != reflect.String {
			return false
		}
		out := reflect.MakeMapWithSize(v.Type(), len(m))
		for k, e := range m {
			ev := reflect.New(v.Type().Elem()).Elem()
			if !assignGeneric(e, ev) {
				return false
			}
			out.SetMapIndex(reflect.ValueOf(k).Convert(v.Type().Key()), ev)
		}
		v.Set(out)
	case reflect.Slice:
		l, ok := raw.([]any)
		if !ok {
			return false
		}
		out := reflect.MakeSlice(v.Type(), len(l), len(l))
		for i, e := range l {
			if !assignGeneric(e, out.Index(i)) {
				return false
			}
		}
		v.Set(out)
	case reflect.Pointer:
		p := reflect.New(v.Type().Elem())
		if !assignGeneric(raw, p.Elem()) {
			return false
		}
		v.Set(p)
	case reflect.String:
		s, ok := raw.(string)
		if !ok {
			return false
		}
		v.SetString(s)
	case reflect.Bool:
		b, ok := raw.(bool)
		if !ok {
			return false
		}
		v.SetBool(b)
	case reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64, reflect.Uint:
		num, ok := raw.(json.Number)
		if !ok {
			return false
		}
		n, err := strconv.ParseUint(num.String(), 10, v.Type().Bits())
		if err != nil {
			return false
		}
		v.SetUint(n)
	case reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64, reflect.Int:
		num, ok := raw.(json.Number)
		if !ok {
			return false
		}
		n, err := strconv.ParseInt(num.String(), 10, v.Type().Bits())
		if err != nil {
			return false
		}
		v.SetInt(n)
	default:
		return false
	}
	return true
}

var (
	jsonUnmarshaler = reflect.TypeFor[json.Unmarshaler]()
	textUnmarshaler = reflect.TypeFor[encoding.TextUnmarshaler]()
)

// fieldsByType caches jsonFields per struct type.
var fieldsByType sync.Map // reflect.Type -> map[string]reflect.StructField

// jsonFields maps the JSON names of t's exported fields to the fields.
// The map is shared and must not be modified.
func jsonFields(t reflect.Type) map[string]reflect.StructField {
	if m, ok := fieldsByType.Load(t); ok {
		return m.(map[string]reflect.StructField)
	}
	out := map[string]reflect.StructField{}
	for i := range t.NumField() {
		f := t.Field(i)
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		if !f.IsExported() || name == "-" {
			continue
		}
		if name == "" {
			name = f.Name
		}
		out[name] = f
	}
	fieldsByType.Store(t, out)
	return out
}

func joinPath(path, field string) string {
	if path == "" {
		return field
	}
	return path + "." + field
}

// describeValue renders a generic value for an error message, briefly.
func describeValue(v any) string {
	switch v := v.(type) {
	case nil:
		return "null"
	case string:
		return strconv.Quote(v)
	case json.Number:
		return "number " + v.String()
	case bool:
		return "boolean " + strconv.FormatBool(v)
	case map[string]any:
		return "a mapping"
	case []any:
		return "a list"
	}
	return fmt.Sprintf("%T", v)
}

func (s *Service) defaultNamespace() {
	s.Metadata.Namespace = namespaceOrDefault(s.Metadata.Namespace)
}

func (p *NetworkPolicy) defaultNamespace() {
	p.Metadata.Namespace = namespaceOrDefault(p.Metadata.Namespace)
}

// normalize applies the remaining defaults documented on the types.
func (s *Service) normalize() {
	s.Status = ServiceStatus{} // written by Isthmus only
	for i := range s.Spec.Ports {
		p := &s.Spec.Ports[i]
		p.Protocol = strings.ToUpper(p.Protocol)
		if p.Protocol == "" {
			p.Protocol = ProtocolTCP
		}
	}
}

func (p *NetworkPolicy) normalize() {
	normPorts := func(ports []PortRule) {
		for i := range ports {
			ports[i].Protocol = ports[i].EffectiveProtocol()
		}
	}
	normEntities := func(es []string) {
		for i := range es {
			es[i] = strings.ToLower(es[i])
		}
	}
	for i := range p.Spec.Ingress {
		normPorts(p.Spec.Ingress[i].ToPorts)
		normEntities(p.Spec.Ingress[i].FromEntities)
	}
	for i := range p.Spec.Egress {
		normPorts(p.Spec.Egress[i].ToPorts)
		normEntities(p.Spec.Egress[i].ToEntities)
	}
}
