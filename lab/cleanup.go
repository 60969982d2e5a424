package lab

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/isthmus-mesh/isthmus/internal/nldump"
)

// CleanupPrefix removes the leftovers of a (crashed) run by name prefix:
// processes in its namespaces, with EnvPrefix set to it or with the prefix
// in their command line (killed with their process groups), network
// namespaces /var/run/netns/<prefix>*, host links <prefix>*, bpffs pin dirs
// /sys/fs/bpf/isthmus/<prefix>*, WireGuard sockets
// /var/run/wireguard/<prefix>*.sock, the leftovers of Kubernetes nodes
// (processes in the cgroups <hierarchy>/<prefix>* and those cgroups, mounts
// under the temp dirs, the pods' /run/netns/cni-* namespaces; see
// kubeclean.go), temp dirs <tmp>/<prefix>-* (kept when
// ISTHMUS_LAB_KEEP=1) and the owner record. The calling process and its
// ancestors are never killed. It tries every step and joins the errors.
func CleanupPrefix(prefix string) error {
	return cleanupPrefix(prefix, os.Getenv(EnvKeep) != "1")
}

// CleanupAll removes everything that carries Marker, i.e. every lab on the
// host, running or not.
func CleanupAll() error { return CleanupPrefix(Marker) }

// CleanupStale removes the leftovers of labs whose owning process is gone
// (a test binary that timed out or was killed). Labs of live processes and
// detached labs are left alone. New runs it unless Options.NoStaleCleanup.
func CleanupStale() error {
	// Collect names first and owner records second: a lab writes its owner
	// record before it creates anything, so nothing seen here belongs to a
	// lab whose record is not written yet.
	prefixes := map[string]bool{}
	add := func(name string) {
		if len(name) >= PrefixLen && prefixRE.MatchString(name[:PrefixLen]) {
			prefixes[name[:PrefixLen]] = true
		}
	}
	for _, dir := range []string{NetnsDir, PinRoot, WireGuardSockDir, os.TempDir()} {
		ents, _ := os.ReadDir(dir)
		for _, e := range ents {
			add(e.Name())
		}
	}
	if links, err := hostLinks(); err == nil {
		for _, lk := range links {
			add(lk.Attrs().Name)
		}
	}
	for _, d := range kubeCgroupDirs(Marker) {
		add(filepath.Base(d))
	}
	ents, _ := os.ReadDir(ownerDir)
	for _, e := range ents {
		add(strings.TrimSuffix(e.Name(), ".json"))
	}
	var errs []error
	for p := range prefixes {
		if ownerAlive(p) {
			continue
		}
		if err := CleanupPrefix(p); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

func ownerAlive(prefix string) bool {
	b, err := os.ReadFile(ownerPath(prefix))
	if err != nil {
		return false
	}
	var o owner
	if err := json.Unmarshal(b, &o); err != nil {
		// A record being written right now is empty; be careful.
		return len(b) == 0
	}
	if o.Detached {
		return true
	}
	// A killed owner can linger as a zombie until its parent reaps it.
	st, err := procStartTime(o.Pid)
	return err == nil && st == o.StartTime && procRunning(o.Pid)
}

func cleanupPrefix(prefix string, removeDirs bool) error {
	if len(prefix) < 4 || strings.ContainsAny(prefix, "/*?[\\ \x00") {
		return fmt.Errorf("lab: refusing to clean up by prefix %q (need at least 4 characters, no path or glob characters)", prefix)
	}
	var errs []error

	// Namespaces, identified also by inode so processes inside them are found.
	nsFiles, _ := filepath.Glob(filepath.Join(NetnsDir, prefix+"*"))
	nsInodes := map[[2]uint64]bool{}
	for _, f := range nsFiles {
		var st unix.Stat_t
		if err := unix.Stat(f, &st); err == nil {
			nsInodes[[2]uint64{st.Dev, st.Ino}] = true
		}
	}
	if err := killMatching(prefix, nsInodes); err != nil {
		errs = append(errs, err)
	}
	if err := cleanupKube(prefix); err != nil {
		errs = append(errs, err)
	}
	for _, f := range nsFiles {
		if err := unix.Unmount(f, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("lab: unmount %s: %w", f, err))
		}
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("lab: remove %s: %w", f, err))
		}
	}

	// Links in the host namespace.
	if links, err := hostLinks(); err != nil {
		errs = append(errs, err)
	} else {
		h, herr := hostHandle()
		if herr != nil {
			errs = append(errs, herr)
		} else {
			for _, lk := range links {
				if !strings.HasPrefix(lk.Attrs().Name, prefix) {
					continue
				}
				if err := h.LinkDel(lk); err != nil && !errors.Is(err, unix.ENODEV) {
					errs = append(errs, fmt.Errorf("lab: delete link %s: %w", lk.Attrs().Name, err))
				}
			}
			h.Close()
		}
	}

	// Files.
	globs := []string{
		filepath.Join(PinRoot, prefix+"*"),
		filepath.Join(PinRoot, "vm-"+prefix+"*"), // external workloads' (vm.go)
		filepath.Join(WireGuardSockDir, prefix+"*.sock"),
		filepath.Join(ownerDir, prefix+"*.json"),
	}
	if removeDirs {
		globs = append(globs, filepath.Join(os.TempDir(), prefix+"*-*"))
	}
	for _, g := range globs {
		matches, _ := filepath.Glob(g)
		for _, m := range matches {
			if err := os.RemoveAll(m); err != nil {
				errs = append(errs, fmt.Errorf("lab: remove %s: %w", m, err))
			}
		}
	}
	return errors.Join(errs...)
}

func hostHandle() (*netlink.Handle, error) {
	h, err := netns.GetFromPath("/proc/self/ns/net")
	if err != nil {
		return nil, fmt.Errorf("lab: open host netns: %w", err)
	}
	defer h.Close()
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		return nil, fmt.Errorf("lab: host netlink handle: %w", err)
	}
	return nh, nil
}

func hostLinks() ([]netlink.Link, error) {
	h, err := hostHandle()
	if err != nil {
		return nil, err
	}
	defer h.Close()
	links, err := nldump.Retry(h.LinkList)
	if err != nil {
		return nil, fmt.Errorf("lab: list host links: %w", err)
	}
	return links, nil
}

// killMatching SIGKILLs every process (and the process group it leads) that
// is inside one of nsInodes, has EnvPrefix=<prefix...> in its environment,
// or has prefix at the start of a word of its command line. It waits until
// they are gone (or zombies).
func killMatching(prefix string, nsInodes map[[2]uint64]bool) error {
	protected := map[int]bool{}
	for pid := os.Getpid(); pid > 0 && !protected[pid]; {
		protected[pid] = true
		pid = procPPid(pid)
	}
	ownPgid := syscall.Getpgrp()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return err
	}
	var victims []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || protected[pid] || pid == 1 {
			continue
		}
		if procMatches(pid, prefix, nsInodes) {
			victims = append(victims, pid)
		}
	}
	for _, pid := range victims {
		if pgid, err := syscall.Getpgid(pid); err == nil && pgid == pid && pgid != ownPgid {
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
		}
		_ = syscall.Kill(pid, syscall.SIGKILL)
	}
	deadline := time.Now().Add(5 * time.Second)
	for _, pid := range victims {
		for procRunning(pid) {
			if time.Now().After(deadline) {
				return fmt.Errorf("lab: pid %d did not die after SIGKILL", pid)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	return nil
}

func procMatches(pid int, prefix string, nsInodes map[[2]uint64]bool) bool {
	dir := "/proc/" + strconv.Itoa(pid)
	if len(nsInodes) > 0 {
		var st unix.Stat_t
		if err := unix.Stat(dir+"/ns/net", &st); err == nil && nsInodes[[2]uint64{st.Dev, st.Ino}] {
			return true
		}
	}
	if env, err := os.ReadFile(dir + "/environ"); err == nil {
		for _, kv := range bytes.Split(env, []byte{0}) {
			if v, ok := bytes.CutPrefix(kv, []byte(EnvPrefix+"=")); ok && bytes.HasPrefix(v, []byte(prefix)) {
				return true
			}
		}
	}
	if cl, err := os.ReadFile(dir + "/cmdline"); err == nil {
		return containsWordPrefix(cl, []byte(prefix), PrefixLen-len(prefix))
	}
	return false
}

// containsWordPrefix reports whether p occurs in b not preceded by a letter
// or digit and followed by at least more characters [0-9a-z] (so "ilab"
// with more=4 matches "/var/run/netns/ilab12ab-n1" but not "available" or
// "-ilabel").
func containsWordPrefix(b, p []byte, more int) bool {
	for i := 0; ; {
		j := bytes.Index(b[i:], p)
		if j < 0 {
			return false
		}
		at := i + j
		if at == 0 || !isAlnum(b[at-1]) {
			rest := b[at+len(p):]
			ok := len(rest) >= more
			for k := 0; ok && k < more; k++ {
				c := rest[k]
				ok = c >= '0' && c <= '9' || c >= 'a' && c <= 'z'
			}
			if ok {
				return true
			}
		}
		i = at + 1
	}
}

func isAlnum(c byte) bool {
	return c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'
}

// procStat returns the fields of /proc/<pid>/stat after the command name
// (field 3, the state, is element 0).
func procStat(pid int) ([]string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return nil, err
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return nil, fmt.Errorf("lab: bad /proc/%d/stat", pid)
	}
	return strings.Fields(string(b[i+1:])), nil
}

func procPPid(pid int) int {
	f, err := procStat(pid)
	if err != nil || len(f) < 2 {
		return 0
	}
	ppid, _ := strconv.Atoi(f[1])
	return ppid
}

func procStartTime(pid int) (uint64, error) {
	f, err := procStat(pid)
	if err != nil {
		return 0, err
	}
	if len(f) < 20 {
		return 0, fmt.Errorf("lab: short /proc/%d/stat", pid)
	}
	return strconv.ParseUint(f[19], 10, 64) // field 22
}

func procRunning(pid int) bool {
	f, err := procStat(pid)
	return err == nil && len(f) > 0 && f[0] != "Z" && f[0] != "X"
}
