package mirror

import (
	"testing"
	"time"

	"github.com/isthmus-mesh/isthmus/clustermesh/kvstore"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
)

// The mirror's batches must fit the embedded etcd's transaction limit.
func TestBatchFitsEmbeddedEtcd(t *testing.T) {
	if etcdserver.MaxTxnOps < MaxTxnOps {
		t.Fatalf("embedded etcd accepts %d operations per transaction, the mirror writes %d", etcdserver.MaxTxnOps, MaxTxnOps)
	}
}

// A live change waits in a batch for flushDelay after the last event, but
// never longer than maxBatchAge after the batch's first: a steady stream
// of changes is written as it comes. The events of the first list fill
// batches instead.
func TestBatchAgeBoundsLiveChanges(t *testing.T) {
	k := &kindMirror{opIndex: map[string]int{}}
	k.queue("a", kvstore.OpPut("a", []byte("1")), 2)
	if got := k.flushIn(); got != flushDelay {
		t.Fatalf("during the first list: flush in %s, want %s", got, flushDelay)
	}
	k.listed = true
	if got := k.flushIn(); got <= 0 || got > flushDelay {
		t.Fatalf("a fresh live batch: flush in %s, want (0, %s]", got, flushDelay)
	}
	k.opsSince = time.Now().Add(-maxBatchAge)
	k.queue("b", kvstore.OpPut("b", []byte("2")), 2) // not the first: the age stays
	if got := k.flushIn(); got > 0 {
		t.Fatalf("a live batch %s old: flush in %s, want now", maxBatchAge, got)
	}
}
