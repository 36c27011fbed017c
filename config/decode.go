package config

import (
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// The file is decoded by walking the yaml.Node tree against the Config
// struct, instead of yaml.Unmarshal, for three reasons: every problem gets
// the dotted key and its line (yaml's type errors carry neither key nor a
// structured line); all problems are collected instead of stopping at the
// first; and a key left out keeps the default already in the struct, while
// the decoder remembers which keys the file set, for messages and for values
// that are inherited (a dataset's vms).

// nodeUnmarshaler is implemented by config types that have more than one
// shape in the file (a dataset as a name or a mapping, vms as "all" or a
// list, a replica target parsed from a URL).
type nodeUnmarshaler interface {
	unmarshalNode(d *decoder, key string, n *yaml.Node)
}

// defaulter is implemented by optional sections (pointers in Config): a
// section present in the file starts from its defaults.
type defaulter interface {
	setDefaults()
}

func (r *Replica) setDefaults() { *r = *defaultReplica() }
func (k *Kopia) setDefaults()   { *k = *defaultKopia() }

var durationType = reflect.TypeOf(time.Duration(0))

// position is where a key was found: the line of the key (for a mapping
// entry) or of the item (for a list item), and the value node.
type position struct {
	line int
	node *yaml.Node
}

type decoder struct {
	errs *Errors
	// seen maps every key path present in the file to its position.
	seen map[string]position
	// failed holds the keys that already have a decoding problem, so that
	// validation does not report them a second time.
	failed map[string]bool
	// plain holds the keys of datasets written as a plain name.
	plain map[string]bool
}

func newDecoder(errs *Errors) *decoder {
	return &decoder{errs: errs, seen: map[string]position{}, failed: map[string]bool{}, plain: map[string]bool{}}
}

// joinKey appends a mapping key to a key path.
func joinKey(parent, name string) string {
	if parent == "" {
		return name
	}
	return parent + "." + name
}

// indexKey appends a list index to a key path.
func indexKey(parent string, i int) string { return parent + "[" + strconv.Itoa(i) + "]" }

// fail records a problem with the value at key.
func (d *decoder) fail(key string, n *yaml.Node, line int, format string, args ...any) {
	value := ""
	if n != nil && n.Kind == yaml.ScalarNode {
		value = n.Value
	}
	if line == 0 && n != nil {
		line = n.Line
	}
	d.failed[key] = true
	d.errs.addf(key, value, line, format, args...)
}

// typeError reports a value of the wrong shape or type.
func (d *decoder) typeError(key string, n *yaml.Node, line int, want string) {
	d.fail(key, n, line, "must be %s, not %s", want, describeNode(n))
}

// describeNode names what a node is, for type errors.
func describeNode(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		switch n.ShortTag() {
		case "!!int":
			return "a number"
		case "!!float":
			return "a decimal number"
		case "!!bool":
			return "true/false"
		case "!!str":
			return "text"
		}
		if tag := strings.TrimPrefix(n.ShortTag(), "!!"); tag != n.ShortTag() {
			return "a " + tag
		}
		// A custom tag (!something) is the user's text: quoted, so that an
		// odd one cannot break the one-line message.
		return fmt.Sprintf("a value tagged %q", n.ShortTag())
	}
	return "this"
}

func resolveAlias(n *yaml.Node) *yaml.Node {
	for n != nil && n.Kind == yaml.AliasNode {
		n = n.Alias
	}
	return n
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

// decode decodes n into v and records key. line is the line of the key that
// introduced n (0 to use n's own). A null value (a key with nothing after the
// colon) leaves v as it is: the default.
func (d *decoder) decode(key string, n *yaml.Node, line int, v reflect.Value) {
	n = resolveAlias(n)
	if line == 0 {
		line = n.Line
	}
	d.seen[key] = position{line: line, node: n}
	if isNull(n) {
		return
	}
	if v.Kind() == reflect.Pointer {
		if v.IsNil() {
			v.Set(reflect.New(v.Type().Elem()))
			if def, ok := v.Interface().(defaulter); ok {
				def.setDefaults()
			}
		}
		d.decode(key, n, line, v.Elem())
		return
	}
	if u, ok := v.Addr().Interface().(nodeUnmarshaler); ok {
		u.unmarshalNode(d, key, n)
		return
	}
	if v.Type() == durationType {
		d.decodeDuration(key, n, line, v)
		return
	}
	switch v.Kind() {
	case reflect.Struct:
		d.decodeStruct(key, n, line, v)
	case reflect.Slice:
		d.decodeSlice(key, n, line, v)
	case reflect.String:
		if n.Kind != yaml.ScalarNode {
			d.typeError(key, n, line, "text")
			return
		}
		v.SetString(n.Value)
	case reflect.Int:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!int" {
			d.typeError(key, n, line, "a whole number")
			return
		}
		var i int
		if err := n.Decode(&i); err != nil {
			d.fail(key, n, line, "is not a whole number that fits: %v", err)
			return
		}
		v.SetInt(int64(i))
	case reflect.Bool:
		if n.Kind != yaml.ScalarNode || n.ShortTag() != "!!bool" {
			d.typeError(key, n, line, "true or false")
			return
		}
		v.SetBool(n.Value == "true" || n.Value == "True" || n.Value == "TRUE")
	default:
		panic(fmt.Sprintf("config: no decoder for %s at %s", v.Type(), key))
	}
}

// decodeDuration reads a Go duration string such as 30s, 5m or 1h30m. A
// bare number is refused: nobody can tell whether 300 meant seconds.
func (d *decoder) decodeDuration(key string, n *yaml.Node, line int, v reflect.Value) {
	if n.Kind != yaml.ScalarNode {
		d.typeError(key, n, line, "a duration like 30s, 5m or 1h30m")
		return
	}
	switch n.ShortTag() {
	case "!!int", "!!float":
		d.fail(key, n, line, "has no unit; write a duration like 30s, 5m or 1h30m")
		return
	}
	dur, err := time.ParseDuration(n.Value)
	if err != nil {
		hint := ""
		if strings.ContainsAny(n.Value, "dD") {
			hint = " (there is no day unit; write 24h)"
		}
		d.fail(key, n, line, "is not a duration; write it like 30s, 5m or 1h30m%s", hint)
		return
	}
	v.SetInt(int64(dur))
}

// decodeSlice reads a list. A single scalar is accepted as a list of one, so
// that "datasets: DATA/libvirt" means what it says.
func (d *decoder) decodeSlice(key string, n *yaml.Node, line int, v reflect.Value) {
	items := n.Content
	switch n.Kind {
	case yaml.SequenceNode:
	case yaml.ScalarNode:
		items = []*yaml.Node{n}
	default:
		d.typeError(key, n, line, "a list")
		return
	}
	s := reflect.MakeSlice(v.Type(), len(items), len(items))
	for i, item := range items {
		d.decode(indexKey(key, i), item, 0, s.Index(i))
	}
	v.Set(s)
}

// decodeStruct reads a mapping into the struct's yaml-tagged fields,
// reporting unknown and repeated keys.
func (d *decoder) decodeStruct(key string, n *yaml.Node, line int, v reflect.Value) {
	if n.Kind != yaml.MappingNode {
		want := "a mapping of keys (name: value lines indented under it)"
		if key == "" {
			want = "a mapping of keys (datasets:, keep_local: ...)"
		}
		d.typeError(key, n, line, want)
		return
	}
	fields := structFields(v.Type())
	first := map[string]int{}
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, val := resolveAlias(n.Content[i]), n.Content[i+1]
		if k.Kind != yaml.ScalarNode {
			d.fail(key, nil, k.Line, "has a key that is %s; keys are plain names", describeNode(k))
			continue
		}
		name := k.Value
		child := joinKey(key, name)
		if name == "<<" {
			d.fail(child, nil, k.Line, "merge keys (<<) are not supported; write the keys out")
			continue
		}
		if prev, dup := first[name]; dup {
			d.fail(child, nil, k.Line, "is given twice (first on line %d); remove one", prev)
			continue
		}
		first[name] = k.Line
		idx, ok := fields[name]
		if !ok {
			d.fail(child, nil, k.Line, "%s", unknownKeyMessage(key, name, v.Type()))
			continue
		}
		d.decode(child, val, k.Line, v.Field(idx))
	}
}

// structFields maps the yaml names of a struct's fields to field indexes.
func structFields(t reflect.Type) map[string]int {
	fields := map[string]int{}
	for i := 0; i < t.NumField(); i++ {
		if name := yamlName(t.Field(i)); name != "" {
			fields[name] = i
		}
	}
	return fields
}

// yamlName is the key of a struct field in the file, "" for fields that
// are not in the file.
func yamlName(f reflect.StructField) string {
	if !f.IsExported() {
		return ""
	}
	name, _, _ := strings.Cut(f.Tag.Get("yaml"), ",")
	if name == "-" {
		return ""
	}
	return name
}

func (ds *Dataset) unmarshalNode(d *decoder, key string, n *yaml.Node) {
	switch n.Kind {
	case yaml.ScalarNode:
		ds.Name = n.Value
		d.plain[key] = true
	case yaml.MappingNode:
		d.decodeStruct(key, n, 0, reflect.ValueOf(ds).Elem())
	default:
		d.typeError(key, n, 0, "a dataset name (DATA/libvirt) or a mapping with name:")
	}
}

func (s *VMSelection) unmarshalNode(d *decoder, key string, n *yaml.Node) {
	const want = `"all" or a list of libvirt domain names, like [web, db]`
	switch n.Kind {
	case yaml.ScalarNode:
		if n.Value != "all" {
			d.fail(key, n, 0, "must be %s", want)
			return
		}
		*s = AllVMs()
	case yaml.SequenceNode:
		names := make([]string, 0, len(n.Content))
		for i, item := range n.Content {
			item = resolveAlias(item)
			ik := indexKey(key, i)
			d.seen[ik] = position{line: item.Line, node: item}
			if item.Kind != yaml.ScalarNode || isNull(item) {
				d.typeError(ik, item, 0, "a libvirt domain name")
				continue
			}
			names = append(names, item.Value)
		}
		*s = VMSelection{Names: names}
	default:
		d.typeError(key, n, 0, want)
	}
}

func (t *ReplicaTarget) unmarshalNode(d *decoder, key string, n *yaml.Node) {
	if n.Kind != yaml.ScalarNode {
		d.typeError(key, n, 0, "a dataset (BACKUP/libvirt) or ssh://user@host/POOL/dataset")
		return
	}
	parsed, err := ParseReplicaTarget(n.Value)
	if err != nil {
		d.fail(key, n, 0, "%v", err)
		return
	}
	*t = parsed
}
