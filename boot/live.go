package boot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	libvirt "github.com/digitalocean/go-libvirt"
	"libvirt.org/go/libvirtxml"

	"github.com/vmhistory/vmhistory/restore"
)

// LiveOptions configure a live restore.
type LiveOptions struct {
	// Dir receives one raw image per disk, NAME-TARGET.raw.
	Dir string
	// Progress, when set, is called every Interval with the bytes copied
	// of all disks.
	Progress func(restore.Progress)
	Interval time.Duration
	// QEMUUser is the user QEMU runs as ("" reads qemu.conf).
	QEMUUser string
}

// RestoreLive copies the disks of the booted domain name out of the mount
// into o.Dir while it runs (libvirt block copy: QEMU mirrors the whole
// chain, the guest's writes included, into a flat raw image), then pivots
// each disk onto its copy: from then on the domain reads nothing of
// vmhistory, and the mount may go. A fresh boot's persistent definition is
// pointed at the copies too. Interrupted (ctx) or failing, the copies are
// abandoned and removed, and the domain runs on from the mount.
func RestoreLive(ctx context.Context, l *libvirt.Libvirt, g Registry, name string, o LiveOptions) (*Record, error) {
	rec, err := g.Load(name)
	if err != nil {
		return nil, err
	}
	if rec.LiveRestore != nil && rec.LiveRestore.Done {
		return rec, fmt.Errorf("%s was live-restored to %s already", name, rec.LiveRestore.Dir)
	}
	dom, found, err := lookup(l, rec)
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, fmt.Errorf("%s is not running (no domain with its UUID %s)", name, rec.UUID)
	}
	if !filepath.IsAbs(o.Dir) {
		return nil, fmt.Errorf("--live-restore %q: give an absolute path", o.Dir)
	}
	if fi, err := os.Stat(o.Dir); err != nil || !fi.IsDir() {
		return nil, fmt.Errorf("--live-restore %s: not a directory (create it first)", o.Dir)
	}
	if err := checkReachable(filepath.Join(o.Dir, "x"), Options{QEMUUser: o.QEMUUser}.qemu()); err != nil {
		return nil, err
	}
	lr := &LiveRestore{Dir: o.Dir, Disks: map[string]string{}}
	var total int64
	for _, d := range rec.Disks {
		if d.Overlay == "" {
			continue
		}
		dest := filepath.Join(o.Dir, safeFileName(rec.Name+"-"+d.Target)+".raw")
		if _, err := os.Lstat(dest); err == nil {
			return nil, fmt.Errorf("%s exists: live restore never overwrites a file; move it or choose another directory", dest)
		}
		lr.Disks[d.Target] = dest
		total += d.Size
	}
	rec.LiveRestore = lr
	if err := g.Save(rec); err != nil {
		return nil, err
	}
	fail := func(err error) (*Record, error) {
		for target, dest := range lr.Disks {
			_ = l.DomainBlockJobAbort(dom, target, 0)
			os.Remove(dest)
		}
		rec.LiveRestore = nil
		return nil, errors.Join(err, g.Save(rec))
	}
	for _, d := range rec.Disks {
		dest, ok := lr.Disks[d.Target]
		if !ok {
			continue
		}
		destXML := fmt.Sprintf("<disk type='file'><source file='%s'/><driver type='raw'/></disk>", xmlEscape(dest))
		err := l.DomainBlockCopy(dom, d.Target, destXML, nil, 0)
		if err != nil && strings.Contains(err.Error(), "transient") {
			err = l.DomainBlockCopy(dom, d.Target, destXML, nil, libvirt.DomainBlockCopyTransientJob)
		}
		if err != nil {
			return fail(fmt.Errorf("copy disk %s of %s to %s: %w", d.Target, name, dest, err))
		}
	}
	start := time.Now()
	interval := o.Interval
	if interval <= 0 {
		interval = time.Second
	}
	pivoted := map[string]bool{}
	lastReport := time.Time{}
	for len(pivoted) < len(lr.Disks) {
		var done int64
		for target := range lr.Disks {
			if pivoted[target] {
				done += diskSize(rec, target)
				continue
			}
			found, _, _, cur, end, err := l.DomainGetBlockJobInfo(dom, target, 0)
			if err != nil {
				return fail(fmt.Errorf("copy of disk %s: %w", target, err))
			}
			if found == 0 {
				return fail(fmt.Errorf("the copy of disk %s ended before it could be pivoted (the guest stopped?)", target))
			}
			if end > 0 {
				done += int64(float64(diskSize(rec, target)) * float64(cur) / float64(end))
			}
			if end > 0 && cur == end {
				if err := l.DomainBlockJobAbort(dom, target, libvirt.DomainBlockJobAbortPivot); err == nil {
					pivoted[target] = true
				} else if !strings.Contains(err.Error(), "not ready") {
					return fail(fmt.Errorf("pivot disk %s onto %s: %w", target, lr.Disks[target], err))
				}
			}
		}
		if o.Progress != nil && time.Since(lastReport) >= interval {
			lastReport = time.Now()
			o.Progress(progressOf(done, total, start))
		}
		if len(pivoted) == len(lr.Disks) {
			break
		}
		select {
		case <-ctx.Done():
			return fail(fmt.Errorf("live restore of %s interrupted: %w; it runs on from the mount", name, ctx.Err()))
		case <-time.After(200 * time.Millisecond):
		}
	}
	if o.Progress != nil {
		o.Progress(progressOf(total, total, start))
	}
	if rec.Persistent {
		if err := repointDefinition(l, dom, lr.Disks); err != nil {
			return nil, fmt.Errorf("%s runs on its copies in %s, but its persistent definition still names the overlays: %w", name, o.Dir, err)
		}
	}
	lr.Done, lr.Finished = true, time.Now().UTC()
	if err := g.Save(rec); err != nil {
		return nil, err
	}
	return rec, nil
}

func diskSize(rec *Record, target string) int64 {
	for _, d := range rec.Disks {
		if d.Target == target {
			return d.Size
		}
	}
	return 0
}

func progressOf(done, total int64, start time.Time) restore.Progress {
	el := time.Since(start)
	p := restore.Progress{Phase: "live-restore", Done: done, Total: total, Elapsed: el, ETA: -1}
	if s := el.Seconds(); s > 0 {
		p.Rate = float64(done) / s
	}
	if p.Rate > 0 {
		p.ETA = time.Duration(float64(total-done) / p.Rate * float64(time.Second))
	}
	return p
}

// repointDefinition makes the persistent definition's disks the copies:
// flat raw images, no backing chain.
func repointDefinition(l *libvirt.Libvirt, dom libvirt.Domain, copies map[string]string) error {
	inactive, err := l.DomainGetXMLDesc(dom, libvirt.DomainXMLInactive)
	if err != nil {
		return err
	}
	def := &libvirtxml.Domain{}
	if err := def.Unmarshal(inactive); err != nil {
		return err
	}
	for i := range def.Devices.Disks {
		d := &def.Devices.Disks[i]
		if d.Target == nil {
			continue
		}
		dest, ok := copies[d.Target.Dev]
		if !ok {
			continue
		}
		d.Source = &libvirtxml.DomainDiskSource{File: &libvirtxml.DomainDiskSourceFile{File: dest}}
		d.BackingStore = nil
		if d.Driver == nil {
			d.Driver = &libvirtxml.DomainDiskDriver{Name: "qemu"}
		}
		d.Driver.Type = "raw"
	}
	xml, err := def.Marshal()
	if err != nil {
		return err
	}
	_, err = l.DomainDefineXML(xml)
	return err
}

func xmlEscape(s string) string {
	r := strings.NewReplacer("&", "&amp;", "'", "&apos;", "<", "&lt;", ">", "&gt;", `"`, "&quot;")
	return r.Replace(s)
}
