package agenttest

import (
	"io"
	"net/http"
	"testing"
)

// Get fetches url with c and returns the status code and body; a transport
// error fails the test.
func Get(t *testing.T, c *http.Client, url string) (int, string) {
	t.Helper()
	resp, err := c.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, string(b)
}
