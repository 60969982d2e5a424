package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"github.com/isthmus-mesh/isthmus/internal/atomicfile"
	"github.com/isthmus-mesh/isthmus/internal/strictjson"
	"os"
)

// WriteFileAtomic replaces path with data so that a crash leaves either the
// old or the new content (see internal/atomicfile).
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	return atomicfile.Write(path, data, perm)
}

// fileVersion is the schema version of the files this package writes.
const fileVersion = 1

// writeJSON writes v (which carries a Version field) as indented JSON.
func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %s: %w", path, err)
	}
	return WriteFileAtomic(path, append(data, '\n'), 0o600)
}

// readJSON loads path into v strictly. A missing file leaves v untouched and
// returns false.
func readJSON(path string, v any) (bool, error) {
	data, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("read state file %s: %w", path, err)
	}
	if err := strictjson.Decode(data, v); err != nil {
		return false, fmt.Errorf("state file %s is corrupt (%v): fix or move it away; the agent will not overwrite it", path, err)
	}
	return true, nil
}
