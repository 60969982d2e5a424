package objects

import (
	"encoding/json"
	"regexp"
	"strconv"
	"strings"
)

// parseSimpleYAML is the fast path of yamlToGeneric for the YAML people
// write for these kinds: block mappings and sequences indented with
// spaces, single-line flow mappings and sequences, plain scalars of
// letters, digits and -_./:+ (resolved as YAML 1.1 and the YAML library
// resolve them: strings, integers, booleans, null), quoted strings
// without escapes, comments. It gives what the YAML library's path gives
// (yamlToGenericViaLibrary; FuzzSimpleYAMLMatchesLibrary checks that),
// and says !ok for anything else, duplicate keys included, which then
// goes to the library and its errors. An apply of a thousand services is
// a thousand documents: the library's tokens, nodes and generic maps cost
// about ten times as much as this.
func parseSimpleYAML(doc []byte) (any, bool) {
	for _, c := range doc {
		if c != '\n' && (c < 0x20 || c >= 0x7f) { // tabs, CR, controls, non-ASCII
			return nil, false
		}
	}
	p := &simpleYAML{}
	for line := range strings.SplitSeq(string(doc), "\n") {
		n := len(line) - len(strings.TrimLeft(line, " "))
		text := strings.TrimRight(line[n:], " ")
		if text == "" || text[0] == '#' {
			continue // blank or comment only
		}
		if n == 0 && (strings.HasPrefix(text, "---") || strings.HasPrefix(text, "...")) {
			return nil, false // a document marker, perhaps
		}
		p.lines = append(p.lines, yamlLine{indent: n, text: text})
	}
	if len(p.lines) == 0 {
		return nil, true // an empty document
	}
	v, ok := p.block(p.lines[0].indent)
	if !ok || p.i != len(p.lines) {
		return nil, false
	}
	return v, true
}

// simpleYAML parses the content lines of a document (blank and comment
// lines left out, indentation measured, trailing blanks cut).
type simpleYAML struct {
	lines []yamlLine
	i     int // the next line to parse
}

type yamlLine struct {
	indent int
	text   string
}

// block parses the mapping or sequence starting at the current line,
// whose entries are at indent.
func (p *simpleYAML) block(indent int) (any, bool) {
	l := p.lines[p.i]
	if l.indent != indent {
		return nil, false
	}
	if isSeqEntry(l.text) {
		return p.sequence(indent)
	}
	return p.mapping(indent, l.text)
}

// isSeqEntry reports whether a line's text is a block sequence entry.
func isSeqEntry(text string) bool { return text == "-" || strings.HasPrefix(text, "- ") }

// mapping parses a block mapping whose keys are at indent; first is the
// text of its first line (after a sequence entry's "- ", for a mapping
// that starts there).
func (p *simpleYAML) mapping(indent int, first string) (any, bool) {
	m := map[string]any{}
	text := first
	for {
		key, rest, ok := cutKey(text)
		if !ok {
			return nil, false
		}
		if _, dup := m[key]; dup {
			return nil, false
		}
		p.i++
		var v any
		if rest == "" {
			// The value is on the lines below: deeper, or a sequence at
			// the key's own indent; else it is null.
			if p.i < len(p.lines) {
				next := p.lines[p.i]
				if next.indent > indent || next.indent == indent && isSeqEntry(next.text) {
					if v, ok = p.block(next.indent); !ok {
						return nil, false
					}
				}
			}
		} else if v, ok = inlineValue(rest); !ok {
			return nil, false
		} else if p.i < len(p.lines) && p.lines[p.i].indent > indent {
			return nil, false // a scalar continued on the next line
		}
		m[key] = v
		if p.i == len(p.lines) || p.lines[p.i].indent < indent {
			return m, true
		}
		if p.lines[p.i].indent > indent || isSeqEntry(p.lines[p.i].text) {
			return nil, false
		}
		text = p.lines[p.i].text
	}
}

// sequence parses a block sequence whose "- " are at indent.
func (p *simpleYAML) sequence(indent int) (any, bool) {
	out := []any{}
	for p.i < len(p.lines) && p.lines[p.i].indent == indent && isSeqEntry(p.lines[p.i].text) {
		text := p.lines[p.i].text
		if text == "-" {
			return nil, false
		}
		item := strings.TrimLeft(text[2:], " ")
		col := indent + len(text) - len(item)
		var v any
		var ok bool
		if _, _, isMap := cutKey(item); isMap && item[0] != '-' {
			// "- key: value": a mapping whose keys are at the column of
			// the first one.
			p.lines[p.i] = yamlLine{indent: col, text: item}
			v, ok = p.mapping(col, item)
		} else {
			p.i++
			v, ok = inlineValue(item)
			if ok && p.i < len(p.lines) && p.lines[p.i].indent > indent {
				return nil, false
			}
		}
		if !ok {
			return nil, false
		}
		out = append(out, v)
	}
	if p.i < len(p.lines) && p.lines[p.i].indent > indent {
		return nil, false
	}
	return out, true
}

// cutKey splits "key: rest" (or "key:") into the key, a plain scalar
// that resolves to a string, and the rest with its comment removed.
func cutKey(text string) (key, rest string, ok bool) {
	n := plainLen(text, false)
	if n == 0 || n == len(text) || text[n] != ':' || n+1 < len(text) && text[n+1] != ' ' {
		return "", "", false
	}
	key = text[:n]
	if !isSimpleKey(key) {
		return "", "", false
	}
	rest = strings.TrimLeft(text[n+1:], " ")
	if rest != "" && rest[0] == '#' {
		rest = ""
	}
	return key, rest, true
}

// isSimpleKey reports whether a plain scalar makes a key this parser
// takes: it resolves to a string (not a number, boolean, null or the
// merge key "<<"), and is short enough for the YAML library to see it as
// a key (at most 1,024 characters; 1,000 here).
func isSimpleKey(key string) bool {
	v, ok := resolvePlain(key)
	return ok && v == key && len(key) <= 1000
}

// plainLen is the length of the plain scalar text starts with, in block
// or flow context: 0 when it does not start with one or holds characters
// outside the simple set. It stops before ": " (or a final ':'), " #"
// and, in flow context, before ',', ']' and '}'; blanks before the stop
// are not counted.
func plainLen(text string, flow bool) int {
	if text == "" || !isPlainStart(text) {
		return 0
	}
	end := 0
	for i := 0; i < len(text); i++ {
		c := text[i]
		switch {
		case c == ':':
			if flow || i+1 == len(text) || text[i+1] == ' ' {
				return end
			}
		case c == ' ':
			if i+1 < len(text) && text[i+1] == '#' {
				return end
			}
			continue
		case flow && (c == ',' || c == ']' || c == '}'):
			return end
		case !isPlainChar(c):
			return 0
		}
		end = i + 1
	}
	return end
}

func isPlainStart(text string) bool {
	switch c := text[0]; {
	case c == '-' || c == '+':
		return len(text) > 1 && text[1] != ' ' && isPlainChar(text[1])
	default:
		return isPlainChar(c) && c != ':' && c != ' '
	}
}

func isPlainChar(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-_./:+", c) >= 0
}

// inlineValue is the value after "key: " or "- ": a flow collection, a
// quoted string or a plain scalar, then nothing but a comment.
func inlineValue(text string) (any, bool) {
	v, rest, ok := flowValue(text, false)
	if !ok {
		return nil, false
	}
	rest = strings.TrimLeft(rest, " ")
	if rest != "" && (rest[0] != '#' || len(rest) == len(text)) {
		return nil, false
	}
	if rest != "" && text[len(text)-len(rest)-1] != ' ' {
		return nil, false // "#" not after a blank is not a comment
	}
	return v, true
}

// flowValue parses one value at the start of text and returns the text
// after it: in flow context (inside [] or {}) a plain scalar ends at ',',
// ']', '}' and may not hold ':'.
func flowValue(text string, flow bool) (any, string, bool) {
	if text == "" {
		return nil, "", false
	}
	switch text[0] {
	case '[':
		return flowSeq(text[1:])
	case '{':
		return flowMap(text[1:])
	case '\'', '"':
		return quoted(text)
	}
	n := plainLen(text, flow)
	if n == 0 || n < len(text) && text[n] == ':' {
		return nil, "", false // not plain, or "a: b: c"
	}
	v, ok := resolvePlain(text[:n])
	return v, text[n:], ok
}

// flowSeq parses the entries of a flow sequence after its '['.
func flowSeq(text string) (any, string, bool) {
	out := []any{}
	text = strings.TrimLeft(text, " ")
	if strings.HasPrefix(text, "]") {
		return out, text[1:], true
	}
	for {
		v, rest, ok := flowValue(text, true)
		if !ok {
			return nil, "", false
		}
		out = append(out, v)
		var done bool
		if text, done, ok = afterEntry(rest, ']'); !ok || done {
			return out, text, ok
		}
	}
}

// afterEntry reads what follows an entry of a flow collection: its
// closing byte (done, and the text after it), or a ',' and the text of
// the next entry (not empty, no second ',').
func afterEntry(rest string, closing byte) (text string, done, ok bool) {
	rest = strings.TrimLeft(rest, " ")
	switch {
	case rest != "" && rest[0] == closing:
		return rest[1:], true, true
	case rest != "" && rest[0] == ',':
		text = strings.TrimLeft(rest[1:], " ")
		return text, false, text != "" && text[0] != closing && text[0] != ','
	}
	return "", false, false
}

// flowMap parses the entries of a flow mapping after its '{'.
func flowMap(text string) (any, string, bool) {
	m := map[string]any{}
	text = strings.TrimLeft(text, " ")
	if strings.HasPrefix(text, "}") {
		return m, text[1:], true
	}
	for {
		n := plainLen(text, true)
		if n == 0 || !strings.HasPrefix(text[n:], ": ") {
			return nil, "", false
		}
		key := text[:n]
		if !isSimpleKey(key) {
			return nil, "", false
		}
		if _, dup := m[key]; dup {
			return nil, "", false
		}
		v, rest, ok := flowValue(strings.TrimLeft(text[n+2:], " "), true)
		if !ok {
			return nil, "", false
		}
		m[key] = v
		var done bool
		if text, done, ok = afterEntry(rest, '}'); !ok || done {
			return m, text, ok
		}
	}
}

// quoted parses a single- or double-quoted string without escapes.
func quoted(text string) (any, string, bool) {
	q := text[0]
	end := strings.IndexByte(text[1:], q)
	if end < 0 {
		return nil, "", false
	}
	s, rest := text[1:1+end], text[2+end:]
	if strings.IndexByte(s, '\\') >= 0 || strings.HasPrefix(rest, string(q)) {
		return nil, "", false // escapes
	}
	return s, rest, true
}

// resolvePlain resolves a plain scalar as the YAML library does (YAML 1.1
// tags: null, booleans, integers, else a string), for what it can give
// as yamlToGeneric does: floats, timestamps, binary integers and the
// merge key say !ok.
func resolvePlain(s string) (any, bool) {
	switch s {
	case "y", "Y", "yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON":
		return true, true
	case "n", "N", "no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF":
		return false, true
	case "~", "null", "Null", "NULL":
		return nil, true
	case ".nan", ".NaN", ".NAN", ".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF", "<<":
		return nil, false
	}
	switch c := s[0]; {
	case c == '.':
		if _, err := strconv.ParseFloat(s, 64); err == nil {
			return nil, false
		}
	case c == '+' || c == '-' || c >= '0' && c <= '9':
		if looksLikeTimestamp(s) {
			return nil, false
		}
		plain := strings.ReplaceAll(s, "_", "")
		if v, err := strconv.ParseInt(plain, 0, 64); err == nil {
			return json.Number(strconv.FormatInt(v, 10)), true
		}
		if v, err := strconv.ParseUint(plain, 0, 64); err == nil {
			return json.Number(strconv.FormatUint(v, 10)), true
		}
		if yamlFloat.MatchString(plain) || strings.HasPrefix(plain, "0b") || strings.HasPrefix(plain, "-0b") {
			return nil, false // a float, or binary
		}
	}
	return s, true
}

// yamlFloat is the YAML library's shape of a float.
var yamlFloat = regexp.MustCompile(`^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$`)

// looksLikeTimestamp is the YAML library's first check for a timestamp:
// four digits and a '-'.
func looksLikeTimestamp(s string) bool {
	return len(s) > 4 && s[4] == '-' && strings.Trim(s[:4], "0123456789") == ""
}
