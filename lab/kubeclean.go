package lab

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// The leftovers of Kubernetes nodes (package lab/kube) that the rest of the
// cleanup by prefix does not cover: every kube node runs its pods in the
// cgroup root /<prefix>-<node> (in every cgroup hierarchy), containerd and
// the kubelet mount overlays, shm and secrets under the lab dir, and the
// CRI puts each pod sandbox into a network namespace bind-mounted at
// /run/netns/cni-<uuid>. The shims carry the lab's temp dir in their
// command line (-address <dir>/.../containerd.sock) and are found by
// killMatching.

// CgroupMounts returns the mount points of the cgroup (v1) and cgroup2
// hierarchies of this host, e.g. /sys/fs/cgroup/cpu, /sys/fs/cgroup/unified.
func CgroupMounts() ([]string, error) {
	var out []string
	err := readMountinfo(func(mountPoint, fsType string) {
		if fsType == "cgroup" || fsType == "cgroup2" {
			out = append(out, mountPoint)
		}
	})
	sort.Strings(out)
	return out, err
}

// readMountinfo calls fn with the mount point and filesystem type of every
// line of /proc/self/mountinfo.
func readMountinfo(fn func(mountPoint, fsType string)) error {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, fl := range fields {
			if fl == "-" {
				sep = i
				break
			}
		}
		if len(fields) < 5 || sep < 0 || sep+1 >= len(fields) {
			continue
		}
		fn(unescapeMount(fields[4]), fields[sep+1])
	}
	return sc.Err()
}

// unescapeMount undoes the octal escapes (\040 for space) of mountinfo.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// kubeCgroupDirs returns the cgroup dirs <hierarchy>/<prefix>* of every
// hierarchy.
func kubeCgroupDirs(prefix string) []string {
	mounts, _ := CgroupMounts()
	var dirs []string
	for _, m := range mounts {
		matches, _ := filepath.Glob(filepath.Join(m, prefix+"*"))
		for _, d := range matches {
			if st, err := os.Lstat(d); err == nil && st.IsDir() {
				dirs = append(dirs, d)
			}
		}
	}
	return dirs
}

// cgroupPids returns the processes in the cgroup dirs and below.
func cgroupPids(dirs []string) map[int]bool {
	pids := map[int]bool{}
	for _, d := range dirs {
		_ = filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
			if err != nil || !e.IsDir() {
				return nil
			}
			b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
			if err != nil {
				return nil
			}
			for _, f := range strings.Fields(string(b)) {
				if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
					pids[pid] = true
				}
			}
			return nil
		})
	}
	return pids
}

// KillCgroups SIGKILLs every process in the cgroup dirs and below until
// they are empty, then removes the dirs (deepest first). It returns the
// network namespaces (device and inode) the processes were in, so the
// caller can find the pod sandboxes' namespaces.
func KillCgroups(dirs []string) (map[[2]uint64]bool, error) {
	nets := map[[2]uint64]bool{}
	own := map[int]bool{}
	for pid := os.Getpid(); pid > 0 && !own[pid]; {
		own[pid] = true
		pid = procPPid(pid)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		pids := cgroupPids(dirs)
		alive := 0
		for pid := range pids {
			if own[pid] {
				continue
			}
			var st unix.Stat_t
			if err := unix.Stat("/proc/"+strconv.Itoa(pid)+"/ns/net", &st); err == nil {
				nets[[2]uint64{st.Dev, st.Ino}] = true
			}
			if procRunning(pid) {
				alive++
			}
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		if alive == 0 {
			break
		}
		if time.Now().After(deadline) {
			return nets, fmt.Errorf("lab: %d processes still in cgroups %v 10s after SIGKILL", alive, dirs)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var errs []error
	for _, d := range dirs {
		var sub []string
		_ = filepath.WalkDir(d, func(p string, e fs.DirEntry, err error) error {
			if err == nil && e.IsDir() {
				sub = append(sub, p)
			}
			return nil
		})
		for i := len(sub) - 1; i >= 0; i-- {
			var err error
			for range 50 { // a killed process leaves its cgroup a moment later
				if err = os.Remove(sub[i]); err == nil || errors.Is(err, os.ErrNotExist) {
					err = nil
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("lab: remove cgroup %s: %w", sub[i], err))
			}
		}
	}
	return nets, errors.Join(errs...)
}

// UnmountUnder unmounts (lazily, deepest first) every mount point at or
// below one of dirs, and every CRI sandbox namespace /run/netns/cni-* whose
// namespace is in nets or that a kube node's containerd under dirs
// recorded (then removes its file).
func UnmountUnder(dirs []string, nets map[[2]uint64]bool) error {
	recorded := recordedSandboxNetns(dirs)
	var points []string
	var nsFiles []string
	err := readMountinfo(func(mp, fsType string) {
		for _, d := range dirs {
			if d != "" && (mp == d || strings.HasPrefix(mp, strings.TrimSuffix(d, "/")+"/")) {
				points = append(points, mp)
				return
			}
		}
		if fsType == "nsfs" && (strings.HasPrefix(mp, "/run/netns/cni-") || strings.HasPrefix(mp, "/var/run/netns/cni-")) {
			var st unix.Stat_t
			if recorded[filepath.Base(mp)] || (unix.Stat(mp, &st) == nil && nets[[2]uint64{st.Dev, st.Ino}]) {
				points = append(points, mp)
				nsFiles = append(nsFiles, mp)
			}
		}
	})
	var errs []error
	if err != nil {
		errs = append(errs, err)
	}
	sort.Slice(points, func(i, j int) bool { return len(points[i]) > len(points[j]) })
	for _, mp := range points {
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("lab: unmount %s: %w", mp, err))
		}
	}
	for _, f := range nsFiles {
		if err := os.Remove(f); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("lab: remove %s: %w", f, err))
		}
	}
	return errors.Join(errs...)
}

// sandboxNetnsRE matches the path of a CRI sandbox namespace.
var sandboxNetnsRE = regexp.MustCompile(`/run/netns/(cni-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})`)

// recordedSandboxNetns returns the names (cni-<uuid>) of the sandbox
// namespaces that the Isthmus agents of the kube nodes under dirs (a lab's
// temp dir) hold endpoints in: their state files (<dir>/helm-state/<node>/
// endpoints/*.json, the chart's agent.stateDir in the lab) name each pod's
// namespace. A sandbox stopped before the lab went down whose network
// teardown did not finish is among them: no process holds its namespace
// any more, so KillCgroups does not find it, while its bind mount stays
// until containerd's teardown succeeds, which it no longer tries.
func recordedSandboxNetns(dirs []string) map[string]bool {
	out := map[string]bool{}
	for _, d := range dirs {
		if d == "" {
			continue
		}
		files, _ := filepath.Glob(filepath.Join(d, "helm-state", "*", "endpoints", "*.json"))
		for _, f := range files {
			b, err := os.ReadFile(f)
			if err != nil {
				continue
			}
			for _, m := range sandboxNetnsRE.FindAllSubmatch(b, -1) {
				out[string(m[1])] = true
			}
		}
	}
	return out
}

// removeShimSockets removes the sockets of the containerd shims of every
// kube node below dir: a killed shim leaves /run/containerd/s/<hash>,
// whose address the shim recorded in its bundle (<containerd state>/
// io.containerd.runtime.v2.task/<namespace>/<id>/address).
func removeShimSockets(dir string) {
	files, _ := filepath.Glob(filepath.Join(dir, "*", "kube", "containerd-state", "io.containerd.runtime.v2.task", "*", "*", "address"))
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		sock := strings.TrimPrefix(strings.TrimSpace(string(b)), "unix://")
		if strings.HasPrefix(sock, "/run/containerd/s/") && !strings.Contains(sock, "..") {
			_ = os.Remove(sock)
		}
	}
}

// cleanupKube removes the Kubernetes leftovers of prefix: the processes
// in its cgroups (pods), the cgroups, the mounts under its temp dirs, the
// sandbox namespaces of its pods, and the kubelet's log symlinks into its
// temp dirs, and the sockets of its killed containerd shims.
func cleanupKube(prefix string) error {
	var errs []error
	nets, err := KillCgroups(kubeCgroupDirs(prefix))
	if err != nil {
		errs = append(errs, err)
	}
	tmpDirs, _ := filepath.Glob(filepath.Join(os.TempDir(), prefix+"*-*"))
	for _, d := range tmpDirs {
		removeShimSockets(d)
	}
	if err := UnmountUnder(tmpDirs, nets); err != nil {
		errs = append(errs, err)
	}
	if links, _ := filepath.Glob("/var/log/containers/*.log"); len(links) > 0 && len(tmpDirs) > 0 {
		for _, lk := range links {
			target, err := os.Readlink(lk)
			if err != nil {
				continue
			}
			for _, d := range tmpDirs {
				if strings.HasPrefix(target, d+"/") {
					_ = os.Remove(lk)
					break
				}
			}
		}
	}
	return errors.Join(errs...)
}
