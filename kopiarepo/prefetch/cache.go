package prefetch

import (
	"container/list"
	"sync"
	"sync/atomic"
)

// ChunkCache holds chunk data by chunk key (the chunk's kopia object ID as
// a string, e.g. "1a2b…" or "Z1a2b…": a content ID, so equal keys hold
// equal bytes in every file of the repository). One cache may be shared
// by many Readers, e.g. all open handles of a FUSE mount; implementations
// must be safe for concurrent use.
//
// Data passed to Put and returned by Get must not be modified by anyone:
// the cache and every Reader share the slices.
type ChunkCache interface {
	Get(key string) ([]byte, bool)
	Put(key string, data []byte)
}

// LRU is a ChunkCache bounded by the bytes it holds, evicting the least
// recently used chunks first.
type LRU struct {
	maxBytes int64

	mu    sync.Mutex
	bytes int64
	order *list.List // front = most recently used; values are *lruEntry
	items map[string]*list.Element

	hits, misses, evictions atomic.Int64
}

type lruEntry struct {
	key  string
	data []byte
}

// NewLRU returns an LRU holding at most maxBytes of chunk data. A chunk
// larger than maxBytes is not kept.
func NewLRU(maxBytes int64) *LRU {
	return &LRU{maxBytes: maxBytes, order: list.New(), items: map[string]*list.Element{}}
}

// Get returns the chunk stored under key, marking it recently used.
func (c *LRU) Get(key string) ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	e, ok := c.items[key]
	if !ok {
		c.misses.Add(1)
		return nil, false
	}
	c.hits.Add(1)
	c.order.MoveToFront(e)
	return e.Value.(*lruEntry).data, true //nolint:forcetypeassert
}

// Put stores a chunk, evicting others to stay within the bound.
func (c *LRU) Put(key string, data []byte) {
	n := int64(len(data))
	if n > c.maxBytes {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if e, ok := c.items[key]; ok {
		c.order.MoveToFront(e)
		return // same key, same bytes
	}
	c.items[key] = c.order.PushFront(&lruEntry{key: key, data: data})
	c.bytes += n
	for c.bytes > c.maxBytes {
		e := c.order.Back()
		le := e.Value.(*lruEntry) //nolint:forcetypeassert
		c.order.Remove(e)
		delete(c.items, le.key)
		c.bytes -= int64(len(le.data))
		c.evictions.Add(1)
	}
}

// CacheStats are an LRU's counters.
type CacheStats struct {
	Chunks                  int
	Bytes, MaxBytes         int64
	Hits, Misses, Evictions int64
}

// Stats returns the cache's size and counters.
func (c *LRU) Stats() CacheStats {
	c.mu.Lock()
	defer c.mu.Unlock()
	return CacheStats{
		Chunks: len(c.items), Bytes: c.bytes, MaxBytes: c.maxBytes,
		Hits: c.hits.Load(), Misses: c.misses.Load(), Evictions: c.evictions.Load(),
	}
}
