package meshsync

import (
	"os"
	"runtime"
	"runtime/pprof"
	"testing"
)

func TestZZHeapProfile(t *testing.T) {
	runtime.MemProfileRate = 512
	tb := tablesFill(100_000)
	runtime.GC()
	f, _ := os.Create("/tmp/heap.prof")
	pprof.WriteHeapProfile(f)
	f.Close()
	runtime.KeepAlive(tb)
}
