package mirror

import (
	"testing"

	"github.com/isthmus-mesh/isthmus/clustermesh/server"
)

// The mirror's batches must fit the embedded etcd's transaction limit.
func TestBatchFitsEmbeddedEtcd(t *testing.T) {
	if server.MaxTxnOps < MaxTxnOps {
		t.Fatalf("embedded etcd accepts %d operations per transaction, the mirror writes %d", server.MaxTxnOps, MaxTxnOps)
	}
}
