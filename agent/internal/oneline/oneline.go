// Package oneline joins errors into one error whose message is one line:
// the local API's error messages are one line each.
package oneline

import "strings"

// Join joins the non-nil errors, dropping repeated messages, with "; ";
// nil when there are none. The result unwraps to the errors kept.
func Join(errs ...error) error {
	var kept []error
	seen := map[string]bool{}
	for _, err := range errs {
		if err != nil && !seen[err.Error()] {
			seen[err.Error()] = true
			kept = append(kept, err)
		}
	}
	if len(kept) == 0 {
		return nil
	}
	return multiErr(kept)
}

type multiErr []error

func (m multiErr) Error() string {
	s := make([]string, len(m))
	for i, err := range m {
		s[i] = err.Error()
	}
	return strings.Join(s, "; ")
}

func (m multiErr) Unwrap() []error { return m }
