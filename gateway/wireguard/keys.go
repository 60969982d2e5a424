package wireguard

import (
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"
)

// The key file holds the private key as wg(8) prints it (base64 and a
// newline), so `wg pubkey < file` works on it.

// loadOrCreateKey returns the private key stored at path, generating and
// storing one (0600) the first time. A key file readable by others is
// tightened to 0600 rather than refused, so a sloppy copy does not keep the
// node out of the mesh, but it is reported.
func loadOrCreateKey(path string, log *slog.Logger) (wgtypes.Key, error) {
	k, err := readKeyFile(path, log)
	if err == nil {
		return k, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return wgtypes.Key{}, err
	}
	k, err = wgtypes.GeneratePrivateKey()
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("generate private key: %w", err)
	}
	tmp, err := stageKeyFile(path, k)
	if err != nil {
		return wgtypes.Key{}, err
	}
	if err := commitKeyFile(tmp, path, log); err != nil {
		return wgtypes.Key{}, err
	}
	log.Info("generated WireGuard private key", "file", path, "publicKey", k.PublicKey().String())
	return k, nil
}

func readKeyFile(path string, log *slog.Logger) (wgtypes.Key, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("read key file: %w", err)
	}
	// The error never quotes the file: it may hold a real key with a typo.
	k, err := wgtypes.ParseKey(strings.TrimSpace(string(b)))
	if err != nil || k == (wgtypes.Key{}) {
		return wgtypes.Key{}, fmt.Errorf("key file %s does not hold a WireGuard private key (base64 of 32 non-zero bytes)", path)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return wgtypes.Key{}, fmt.Errorf("stat key file: %w", err)
	}
	if perm := fi.Mode().Perm(); perm&0o077 != 0 {
		if err := os.Chmod(path, 0o600); err != nil {
			return wgtypes.Key{}, fmt.Errorf("key file %s has mode %v and cannot be tightened: %w", path, perm, err)
		}
		log.Warn("WireGuard key file was readable by others; set to 0600", "file", path, "was", perm.String())
	}
	return k, nil
}

// stageKeyFile writes k next to path in a temporary 0600 file, synced to
// disk; commitKeyFile renames it into place. Split so Rotate can apply the
// key to the device between the two and never persist a key it could not
// use.
func stageKeyFile(path string, k wgtypes.Key) (string, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("create key dir: %w", err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return "", fmt.Errorf("create key file: %w", err)
	}
	tmp := f.Name()
	_, werr := f.WriteString(k.String() + "\n")
	if werr == nil {
		werr = f.Chmod(0o600)
	}
	if werr == nil {
		werr = f.Sync()
	}
	if cerr := f.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("write key file %s: %w", tmp, werr)
	}
	return tmp, nil
}

// commitKeyFile renames tmp to path. Once the rename succeeded the new key is
// the node's key, so a failure to sync the directory afterwards is only
// logged: the caller must not roll back to a key the file no longer holds.
func commitKeyFile(tmp, path string, log *slog.Logger) error {
	if err := os.Rename(tmp, path); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("install key file: %w", err)
	}
	if err := syncDir(filepath.Dir(path)); err != nil {
		log.Warn("WireGuard key file renamed but its directory not synced; a crash now may bring back the previous key", "file", path, "err", err)
	}
	return nil
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Rotate replaces the device's private key with a new one and persists it
// atomically, returning the new public key. The new key is written aside,
// applied, then renamed into place; if the rename fails the old key is put
// back, so the file and the device never disagree.
//
// Peers reject handshakes from the new key until they learn it (the caller
// publishes it in the node record); sessions keyed with the old key are
// dropped by WireGuard, and traffic resumes after one handshake once both
// sides know the new key.
func (d *Device) Rotate() (string, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.closed {
		return "", errClosed
	}
	k, err := wgtypes.GeneratePrivateKey()
	if err != nil {
		return "", fmt.Errorf("generate private key: %w", err)
	}
	tmp, err := stageKeyFile(d.keyFile, k)
	if err != nil {
		return "", err
	}
	if err := d.wg.ConfigureDevice(d.name, wgtypes.Config{PrivateKey: &k}); err != nil {
		os.Remove(tmp)
		return "", fmt.Errorf("apply new private key to %s: %w", d.name, err)
	}
	if err := commitKeyFile(tmp, d.keyFile, d.log); err != nil {
		if rerr := d.wg.ConfigureDevice(d.name, wgtypes.Config{PrivateKey: &d.key}); rerr != nil {
			return "", fmt.Errorf("%w; restoring the old key on %s also failed: %v", err, d.name, rerr)
		}
		return "", err
	}
	old := d.key.PublicKey().String()
	d.key = k
	d.log.Info("rotated WireGuard private key", "old", old, "publicKey", k.PublicKey().String())
	return k.PublicKey().String(), nil
}
