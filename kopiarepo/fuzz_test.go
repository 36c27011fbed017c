package kopiarepo

import (
	"encoding/json"
	"strings"
	"testing"

	"github.com/kopia/kopia/snapshot"
)

// FuzzSnapshotFromManifest: a snapshot manifest read back from a
// repository (written by vmhistory, kopia's CLI or a damaged store) never
// panics the reader, and the tags it yields are exactly the manifest's
// "tag:" labels without the prefix.
func FuzzSnapshotFromManifest(f *testing.F) {
	f.Add([]byte(`{"id":"k1","source":{"host":"kvm1","userName":"root","path":"/var/lib/libvirt"},"description":"DATA/libvirt@2023-03-04_05:00:01","startTime":"2023-03-04T05:00:01Z","endTime":"2023-03-04T05:01:00Z","rootEntry":{"name":"libvirt","type":"d","obj":"kabc","summ":{"size":1024,"files":2,"dirs":1}},"tags":{"tag:vmhistory-guid":"1234","tag:vmhistory-dataset":"DATA/libvirt","tag:vmhistory-snapshot":"2023-03-04_05:00:01","type":"snapshot"}}`))
	f.Add([]byte(`{"rootEntry":{"obj":"not-an-object-id"},"tags":{"tag:":"","tag:a:b":"c"}}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var m snapshot.Manifest
		if json.Unmarshal(data, &m) != nil {
			return
		}
		s := snapshotFromManifest(&m)
		want := 0
		for k, v := range m.Tags {
			key, ok := strings.CutPrefix(k, kopiaTagPrefix)
			if !ok {
				continue
			}
			want++
			if got, ok := s.Tags[key]; !ok || got != v {
				t.Fatalf("label %q=%q read back as %q (%v)", k, v, got, ok)
			}
		}
		if len(s.Tags) != want {
			t.Fatalf("%d tags from %d tag labels: %v", len(s.Tags), want, s.Tags)
		}
	})
}

// FuzzKopiaTags: tags vmhistory writes read back unchanged.
func FuzzKopiaTags(f *testing.F) {
	f.Add("vmhistory-guid", "1234")
	f.Add("a:b", "")
	f.Fuzz(func(t *testing.T, key, value string) {
		labels, err := kopiaTags(map[string]string{key: value})
		if err != nil {
			return
		}
		m := snapshot.Manifest{Tags: labels}
		if got := snapshotFromManifest(&m).Tags; len(got) != 1 || got[key] != value {
			t.Fatalf("tag %q=%q reads back as %v", key, value, got)
		}
	})
}
