package kube

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/isthmus-mesh/isthmus/lab"
)

// Leftovers lists what of the lab with prefix and directory dir is still
// on the host: the directory, mounts under it, processes (the prefix in
// their environment or the directory in their command line), network
// namespaces (the lab's and the pods' podNetns, names under
// lab.NetnsDir), cgroups, pinned BPF objects and WireGuard sockets. Empty
// means the lab is gone; tests check it after `lab down`.
func Leftovers(prefix, dir string, podNetns []string) []string {
	var out []string
	if _, err := os.Stat(dir); err == nil {
		out = append(out, "lab dir "+dir)
	}
	for _, m := range MountsUnder(dir) {
		out = append(out, "mount "+m)
	}
	for _, p := range ProcessesOf(prefix, dir) {
		out = append(out, "process "+p)
	}
	globs := []string{
		filepath.Join(lab.NetnsDir, prefix+"-*"),
		filepath.Join(lab.PinRoot, prefix+"*"),
		filepath.Join("/var/run/wireguard", prefix+"*"),
	}
	if mounts, err := lab.CgroupMounts(); err == nil {
		for _, m := range mounts {
			globs = append(globs, filepath.Join(m, prefix+"*"))
		}
	}
	for _, g := range globs {
		found, _ := filepath.Glob(g)
		out = append(out, found...)
	}
	for _, n := range podNetns {
		if _, err := os.Stat(filepath.Join(lab.NetnsDir, n)); err == nil {
			out = append(out, "pod netns "+n)
		}
	}
	return out
}

// MountsUnder lists the mount points under dir.
func MountsUnder(dir string) []string {
	b, _ := os.ReadFile("/proc/self/mountinfo")
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && strings.HasPrefix(f[4], dir) {
			out = append(out, f[4])
		}
	}
	return out
}

// ProcessesOf lists the live processes that carry the lab prefix in their
// environment or the lab dir in their command line.
func ProcessesOf(prefix, dir string) []string {
	ents, _ := os.ReadDir("/proc")
	var out []string
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if i := strings.LastIndexByte(string(st), ')'); i > 0 && strings.HasPrefix(strings.TrimSpace(string(st[i+1:])), "Z") {
			continue
		}
		env, _ := os.ReadFile(fmt.Sprintf("/proc/%d/environ", pid))
		cl, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if strings.Contains(string(env), lab.EnvPrefix+"="+prefix) || strings.Contains(string(cl), dir) {
			out = append(out, fmt.Sprintf("%d %s", pid, strings.ReplaceAll(string(cl), "\x00", " ")))
		}
	}
	return out
}
