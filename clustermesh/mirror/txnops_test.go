package mirror

import (
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/etcdserver"
)

// The mirror's batches must fit the embedded etcd's transaction limit.
func TestBatchFitsEmbeddedEtcd(t *testing.T) {
	if etcdserver.MaxTxnOps < MaxTxnOps {
		t.Fatalf("embedded etcd accepts %d operations per transaction, the mirror writes %d", etcdserver.MaxTxnOps, MaxTxnOps)
	}
}
