package wireguard

import (
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

func TestKeyFile(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	path := filepath.Join(t.TempDir(), "state", "wireguard.key")

	k1, err := loadOrCreateKey(path, log)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Errorf("key file mode %v, want 0600", fi.Mode().Perm())
	}
	if di, _ := os.Stat(filepath.Dir(path)); di.Mode().Perm() != 0o700 {
		t.Errorf("key dir mode %v, want 0700", di.Mode().Perm())
	}
	b, _ := os.ReadFile(path)
	if string(b) != k1.String()+"\n" {
		t.Errorf("key file is not wg(8) format: %q", b)
	}

	k2, err := loadOrCreateKey(path, log)
	if err != nil || k2 != k1 {
		t.Fatalf("key not reused: %v", err)
	}

	// Loose permissions are tightened, not refused.
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if k3, err := loadOrCreateKey(path, log); err != nil || k3 != k1 {
		t.Fatalf("reload after chmod: %v", err)
	}
	if fi, _ := os.Stat(path); fi.Mode().Perm() != 0o600 {
		t.Errorf("mode not tightened: %v", fi.Mode().Perm())
	}

	// Garbage is refused without quoting the file.
	secret := "c2VjcmV0IGJ1dCBub3QgYSBrZXk="
	if err := os.WriteFile(path, []byte(secret), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err = loadOrCreateKey(path, log)
	if err == nil || strings.Contains(err.Error(), secret) {
		t.Fatalf("garbage key file: %v", err)
	}
	if err := os.WriteFile(path, []byte(wgtypes.Key{}.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := loadOrCreateKey(path, log); err == nil {
		t.Fatal("zero key accepted")
	}

	// No temporary files are left behind.
	ents, _ := os.ReadDir(filepath.Dir(path))
	if len(ents) != 1 {
		t.Errorf("key dir holds %d entries, want 1", len(ents))
	}
}
