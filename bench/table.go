// Package bench reproduces, on the user's own data, the measurements that
// decide a vmhistory set-up, and prints them as tables for people (aligned
// text) and for programs (--json, --csv).
package bench

import (
	"encoding/csv"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
)

// Cell is one value of a table: Text is what a person reads, Value what
// JSON and CSV carry (a number stays a number there).
type Cell struct {
	Text  string
	Value any
}

// Num is a numeric cell printed with format.
func Num(v float64, format string) Cell { return Cell{Text: fmt.Sprintf(format, v), Value: v} }

// Int is an integer cell.
func Int(v int64) Cell { return Cell{Text: fmt.Sprint(v), Value: v} }

// Str is a text cell.
func Str(s string) Cell { return Cell{Text: s, Value: s} }

// Table is the result of one bench.
type Table struct {
	Title   string
	Columns []string
	Rows    [][]Cell
	// Notes are printed under the text table and kept in JSON.
	Notes []string
}

// Add appends a row; it must have one cell per column.
func (t *Table) Add(cells ...Cell) { t.Rows = append(t.Rows, cells) }

// WriteText prints an aligned table, numbers right-aligned.
func (t *Table) WriteText(w io.Writer) error {
	if t.Title != "" {
		fmt.Fprintf(w, "%s\n\n", t.Title)
	}
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', tabwriter.AlignRight)
	fmt.Fprintln(tw, strings.Join(t.Columns, "\t")+"\t")
	for _, row := range t.Rows {
		texts := make([]string, len(row))
		for i, c := range row {
			texts[i] = c.Text
		}
		fmt.Fprintln(tw, strings.Join(texts, "\t")+"\t")
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, n := range t.Notes {
		fmt.Fprintf(w, "\n%s", n)
	}
	if len(t.Notes) > 0 {
		fmt.Fprintln(w)
	}
	return nil
}

// WriteJSON prints {"title", "columns", "rows": [{column: value}], "notes"}.
func (t *Table) WriteJSON(w io.Writer) error {
	rows := make([]map[string]any, 0, len(t.Rows))
	for _, row := range t.Rows {
		m := map[string]any{}
		for i, c := range row {
			m[jsonKey(t.Columns[i])] = c.Value
		}
		rows = append(rows, m)
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(map[string]any{"title": t.Title, "columns": t.Columns, "rows": rows, "notes": t.Notes})
}

// WriteCSV prints a header line and one line per row, values unformatted.
func (t *Table) WriteCSV(w io.Writer) error {
	cw := csv.NewWriter(w)
	if err := cw.Write(t.Columns); err != nil {
		return err
	}
	for _, row := range t.Rows {
		rec := make([]string, len(row))
		for i, c := range row {
			rec[i] = fmt.Sprint(c.Value)
		}
		if err := cw.Write(rec); err != nil {
			return err
		}
	}
	cw.Flush()
	return cw.Error()
}

// jsonKey turns "MB/s" or "blob requests" into "mb_per_s", "blob_requests".
func jsonKey(col string) string {
	r := strings.NewReplacer("/", "_per_", " ", "_", "-", "_", "%", "pct", "×", "x", "(", "", ")", "")
	return strings.ToLower(r.Replace(col))
}
