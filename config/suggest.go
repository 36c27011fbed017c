package config

import (
	"fmt"
	"reflect"
	"sort"
	"strings"
)

// unknownKeyMessage explains an unknown key: a close match at the same
// level ("kepp_local" → "keep_local", "keep-local" → "keep_local"), else the
// same key in another section ("password_file" at the top → kopia), else the
// keys that are valid there.
func unknownKeyMessage(parent, name string, t reflect.Type) string {
	var known []string
	for i := 0; i < t.NumField(); i++ {
		if n := yamlName(t.Field(i)); n != "" {
			known = append(known, n)
		}
	}
	msg := fmt.Sprintf("unknown key %q", name)
	if s := closest(name, known); s != "" {
		return msg + fmt.Sprintf("; did you mean %q?", s)
	}
	var elsewhere []string
	for _, path := range keyPaths("", reflect.TypeOf(Config{})) {
		last := path[strings.LastIndexAny(path, ".]")+1:]
		if normalizeKey(last) == normalizeKey(name) && !strings.HasPrefix(path, parent+".") && path != name {
			elsewhere = append(elsewhere, path)
		}
	}
	if len(elsewhere) > 0 {
		return msg + fmt.Sprintf("; did you mean %s? (check the indentation)", quoteList(elsewhere, " or "))
	}
	sort.Strings(known)
	where := "here"
	if parent != "" {
		where = "under " + parent
	}
	return msg + fmt.Sprintf("; the keys %s are: %s", where, strings.Join(known, ", "))
}

// keyPaths lists every key path of a config type; list items are written
// as "datasets[].name".
func keyPaths(prefix string, t reflect.Type) []string {
	for t.Kind() == reflect.Pointer || t.Kind() == reflect.Slice {
		if t.Kind() == reflect.Slice {
			prefix += "[]"
		}
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct || t == reflect.TypeOf(VMSelection{}) || t == reflect.TypeOf(ReplicaTarget{}) {
		return nil
	}
	var paths []string
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		name := yamlName(f)
		if name == "" {
			continue
		}
		p := joinKey(prefix, name)
		paths = append(paths, p)
		paths = append(paths, keyPaths(p, f.Type)...)
	}
	return paths
}

func quoteList(items []string, sep string) string {
	q := make([]string, len(items))
	for i, s := range items {
		q[i] = fmt.Sprintf("%q", s)
	}
	return strings.Join(q, sep)
}

// normalizeKey folds the differences people make when typing key names
// from memory: case, and - or _ between words.
func normalizeKey(s string) string {
	return strings.NewReplacer("_", "", "-", "").Replace(strings.ToLower(s))
}

// closest returns the candidate nearest to s when it is near enough to be
// what was meant, else "". The allowed edit distance grows with the length,
// so short words do not match everything.
func closest(s string, candidates []string) string {
	best, bestDist := "", 0
	var prefixed []string
	for _, c := range candidates {
		if len(s) >= 3 && strings.HasPrefix(normalizeKey(c), normalizeKey(s)) {
			prefixed = append(prefixed, c)
		}
		if normalizeKey(c) == normalizeKey(s) {
			return c
		}
		dist := levenshtein(strings.ToLower(s), strings.ToLower(c))
		limit := 1
		switch n := len(c); {
		case n > 10:
			limit = 3
		case n > 4:
			limit = 2
		}
		if dist <= limit && (best == "" || dist < bestDist) {
			best, bestDist = c, dist
		}
	}
	if best == "" && len(prefixed) == 1 {
		// A name cut short: "zstd-better" for "zstd-better-compression".
		return prefixed[0]
	}
	return best
}

// levenshtein is the edit distance between a and b, with a transposition of
// two adjacent characters counting as one edit (kepp → keep).
func levenshtein(a, b string) int {
	ra, rb := []rune(a), []rune(b)
	// d[i][j] is the distance between ra[:i] and rb[:j].
	d := make([][]int, len(ra)+1)
	for i := range d {
		d[i] = make([]int, len(rb)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(ra); i++ {
		for j := 1; j <= len(rb); j++ {
			cost := 1
			if ra[i-1] == rb[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && ra[i-1] == rb[j-2] && ra[i-2] == rb[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(ra)][len(rb)]
}
