package backup

import (
	"context"
	"strings"
	"testing"

	"github.com/vmhistory/vmhistory/virt"
)

// After a crash that left web, db and mail stopped and recorded, the admin
// undefined db and started then shut down mail. The next night starts web
// only, drops db and mail from the record with a warning each, and goes
// on with its snapshot, and so does the night after: before, mail was
// booted from its disks, and db failed the recover step every night until
// stopped-vms.json was edited by hand.
func TestRecoveryDropsUndefinedAndShutDownVMs(t *testing.T) {
	sb := newSandbox(t, "managedsave", 20, "")
	ctx := context.Background()
	record, err := LoadStoppedVMs(sb.cfg.StateDir)
	if err != nil {
		t.Fatal(err)
	}
	record.Begin("killed-run")
	q := &virt.Quiescer{Conn: sb.conn, Mode: virt.ModeManagedSave, Mountpoint: sb.mountpoint,
		OnStopping: func(vm string) error {
			return record.Add(StoppedVM{Name: vm, Mode: "managedsave", Dataset: sb.dataset, Mountpoint: sb.mountpoint})
		}}
	var doms []virt.Domain
	for _, name := range []string{"web", "db", "mail"} {
		d, err := sb.conn.Domain(ctx, name)
		if err != nil {
			t.Fatal(err)
		}
		doms = append(doms, d)
	}
	if _, err := q.Quiesce(ctx, doms); err != nil {
		t.Fatal(err)
	}
	lv := sb.conn.Client()
	db, err := lv.DomainLookupByName("db")
	if err != nil {
		t.Fatal(err)
	}
	if err := lv.DomainManagedSaveRemove(db, 0); err != nil {
		t.Fatal(err)
	}
	if err := lv.DomainUndefine(db); err != nil {
		t.Fatal(err)
	}
	mail, err := lv.DomainLookupByName("mail")
	if err != nil {
		t.Fatal(err)
	}
	if err := lv.DomainCreate(mail); err != nil { // from its image
		t.Fatal(err)
	}
	if err := lv.DomainDestroy(mail); err != nil {
		t.Fatal(err)
	}

	for i, at := range nights[:2] {
		rep := sb.night(sb.pipeline(), at, Options{SkipReplicate: true})
		var b strings.Builder
		rep.WriteText(&b)
		if err := rep.Err(); err != nil {
			t.Fatalf("night %d: %v\n%s", i+1, err, b.String())
		}
		if len(rep.Snapshots) != 1 {
			t.Errorf("night %d took no snapshot\n%s", i+1, b.String())
		}
		if i == 0 {
			warnings := strings.Join(rep.Warnings, "\n")
			for _, want := range []string{"VM db", "no longer exists", "VM mail", "no managed-save image"} {
				if !strings.Contains(warnings, want) {
					t.Errorf("warnings lack %q:\n%s", want, warnings)
				}
			}
		}
		if st := sb.state("web"); !st.Running() {
			t.Errorf("night %d: web is %v, want running", i+1, st)
		}
		if st := sb.state("mail"); st.Running() {
			t.Errorf("night %d: mail, shut down by its admin after the crash, was started", i+1)
		}
		if st := sb.state("old"); st.Running() {
			t.Errorf("night %d: the VM the admin stopped was started", i+1)
		}
		if record, _ := LoadStoppedVMs(sb.cfg.StateDir); !record.Empty() {
			t.Errorf("night %d: stopped-VM record still lists %v", i+1, record.Names())
		}
	}
}
