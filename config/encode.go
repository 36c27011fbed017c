package config

import (
	"bytes"
	"encoding/json"
	"fmt"
	"reflect"
	"strconv"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"
)

// A Config is printed ("vmhistory config check") in the same shape as it is
// written: snake_case keys in file order, durations as 5m rather than
// nanoseconds, targets as URLs. Both YAML and JSON are rendered from one
// yaml.Node tree so that they cannot drift apart.

// nodeMarshaler is implemented by types whose file form is not their Go
// struct (see nodeUnmarshaler).
type nodeMarshaler interface {
	marshalNode() *yaml.Node
}

// Node renders the configuration as a YAML node tree.
func (c *Config) Node() *yaml.Node { return encodeValue(reflect.ValueOf(c).Elem()) }

// MarshalYAML renders the configuration in the file's format.
func (c Config) MarshalYAML() (any, error) { return c.Node(), nil }

// MarshalJSON renders the configuration with the file's keys, in file order.
func (c Config) MarshalJSON() ([]byte, error) {
	var buf bytes.Buffer
	if err := writeJSON(&buf, c.Node()); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func scalarNode(tag, value string) *yaml.Node {
	return &yaml.Node{Kind: yaml.ScalarNode, Tag: tag, Value: value}
}

func encodeValue(v reflect.Value) *yaml.Node {
	if v.Kind() == reflect.Pointer {
		if v.IsNil() {
			return scalarNode("!!null", "null")
		}
		return encodeValue(v.Elem())
	}
	if v.CanInterface() {
		if m, ok := v.Interface().(nodeMarshaler); ok {
			return m.marshalNode()
		}
	}
	if v.Type() == durationType {
		return scalarNode("!!str", formatDuration(time.Duration(v.Int())))
	}
	switch v.Kind() {
	case reflect.Struct:
		n := &yaml.Node{Kind: yaml.MappingNode, Tag: "!!map"}
		t := v.Type()
		for i := 0; i < t.NumField(); i++ {
			f := t.Field(i)
			name := yamlName(f)
			if name == "" {
				continue
			}
			fv := v.Field(i)
			if strings.HasSuffix(f.Tag.Get("yaml"), ",omitempty") && fv.IsZero() {
				continue
			}
			n.Content = append(n.Content, scalarNode("!!str", name), encodeValue(fv))
		}
		return n
	case reflect.Slice:
		n := &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq"}
		for i := 0; i < v.Len(); i++ {
			n.Content = append(n.Content, encodeValue(v.Index(i)))
		}
		return n
	case reflect.String:
		return scalarNode("!!str", v.String())
	case reflect.Int:
		return scalarNode("!!int", strconv.FormatInt(v.Int(), 10))
	case reflect.Bool:
		return scalarNode("!!bool", strconv.FormatBool(v.Bool()))
	}
	panic(fmt.Sprintf("config: no encoder for %s", v.Type()))
}

func (s VMSelection) marshalNode() *yaml.Node {
	if s.All {
		return scalarNode("!!str", "all")
	}
	n := &yaml.Node{Kind: yaml.SequenceNode, Tag: "!!seq", Style: yaml.FlowStyle}
	for _, name := range s.Names {
		n.Content = append(n.Content, scalarNode("!!str", name))
	}
	return n
}

func (t ReplicaTarget) marshalNode() *yaml.Node { return scalarNode("!!str", t.String()) }

// formatDuration writes a duration the way people write them in the file:
// 5m rather than 5m0s, 1h rather than 1h0m0s.
func formatDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}

// writeJSON renders a node tree as JSON, keeping mapping order.
func writeJSON(buf *bytes.Buffer, n *yaml.Node) error {
	switch n.Kind {
	case yaml.MappingNode:
		buf.WriteByte('{')
		for i := 0; i+1 < len(n.Content); i += 2 {
			if i > 0 {
				buf.WriteByte(',')
			}
			k, _ := json.Marshal(n.Content[i].Value)
			buf.Write(k)
			buf.WriteByte(':')
			if err := writeJSON(buf, n.Content[i+1]); err != nil {
				return err
			}
		}
		buf.WriteByte('}')
	case yaml.SequenceNode:
		buf.WriteByte('[')
		for i, item := range n.Content {
			if i > 0 {
				buf.WriteByte(',')
			}
			if err := writeJSON(buf, item); err != nil {
				return err
			}
		}
		buf.WriteByte(']')
	case yaml.ScalarNode:
		switch n.Tag {
		case "!!int", "!!bool":
			buf.WriteString(n.Value)
		case "!!null":
			buf.WriteString("null")
		default:
			s, _ := json.Marshal(n.Value)
			buf.Write(s)
		}
	default:
		return fmt.Errorf("config: cannot render YAML node kind %d as JSON", n.Kind)
	}
	return nil
}

// YAML renders the configuration as YAML indented like example.yaml.
func (c *Config) YAML() ([]byte, error) {
	var buf bytes.Buffer
	enc := yaml.NewEncoder(&buf)
	enc.SetIndent(2)
	if err := enc.Encode(c.Node()); err != nil {
		return nil, err
	}
	if err := enc.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
