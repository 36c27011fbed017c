package prefetch

import (
	"bytes"
	"context"
	"io"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/kopia/kopia/repo"
	"github.com/kopia/kopia/repo/blob/filesystem"
	"github.com/kopia/kopia/repo/content"
	"github.com/kopia/kopia/repo/format"
	"github.com/kopia/kopia/repo/object"
)

// TestInPlaceDecryption reads a file of repositories made with each of
// kopia's encryptions, and with error correction: the bytes are the
// file's; the in-place decryption is used (after agreeing with kopia's
// on the first content) for both encryptions, and left out where error
// correction wraps the ciphertext.
func TestInPlaceDecryption(t *testing.T) {
	ctx := context.Background()
	data := make([]byte, 3<<20+777)
	rng := rand.New(rand.NewPCG(5, 5))
	for i := range data {
		data[i] = byte(rng.Uint32())
	}
	for _, c := range []struct {
		encryption, ecc string
		inPlace         bool
	}{
		{"AES256-GCM-HMAC-SHA256", "", true},
		{"CHACHA20-POLY1305-HMAC-SHA256", "", true},
		{"AES256-GCM-HMAC-SHA256", "REED-SOLOMON-CRC32", false},
	} {
		dir := t.TempDir()
		st, err := filesystem.New(ctx, &filesystem.Options{Path: filepath.Join(dir, "repo")}, true)
		if err != nil {
			t.Fatal(err)
		}
		bf := format.ContentFormat{Encryption: c.encryption, ECC: c.ecc}
		if c.ecc != "" {
			bf.ECCOverheadPercent = 10
		}
		const password = "in-place"
		if err := repo.Initialize(ctx, st, &repo.NewRepositoryOptions{BlockFormat: bf}, password); err != nil {
			t.Fatal(err)
		}
		config := filepath.Join(dir, "kopia.config")
		if err := repo.Connect(ctx, config, st, password, &repo.ConnectOptions{CachingOptions: content.CachingOptions{CacheDirectory: filepath.Join(dir, "cache")}}); err != nil {
			t.Fatal(err)
		}
		rep, err := repo.Open(ctx, config, password, nil)
		if err != nil {
			t.Fatal(err)
		}
		var oid object.ID
		if err := repo.WriteSession(ctx, rep, repo.WriteSessionOptions{Purpose: "in-place test"}, func(ctx context.Context, w repo.RepositoryWriter) error {
			ow := w.NewObjectWriter(ctx, object.WriterOptions{Splitter: "FIXED-128K"})
			defer ow.Close()
			if _, err := ow.Write(data); err != nil {
				return err
			}
			oid, err = ow.Result()
			return err
		}); err != nil {
			t.Fatal(err)
		}
		r, err := Open(ctx, rep, oid, Options{Mode: ModePackRanges})
		if err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(r)
		r.Close()
		rep.Close(ctx)
		st.Close(ctx)
		name := c.encryption + "+" + c.ecc
		if err != nil || !bytes.Equal(got, data) {
			t.Errorf("%s: read %d bytes (%v), equal %v", name, len(got), err, bytes.Equal(got, data))
			continue
		}
		if r.Stats().Mode != ModePackRanges {
			t.Errorf("%s: read in mode %v", name, r.Stats().Mode)
		}
		ip := r.codec.inPlace
		switch {
		case c.inPlace && (ip == nil || !ip.checked.Load() || ip.disabled.Load()):
			t.Errorf("%s: in-place decryption not in use: %+v", name, ip)
		case !c.inPlace && ip != nil:
			t.Errorf("%s: in-place decryption set up for a format it does not know", name)
		}
	}
}

// TestInPlaceDecryptionDisagreeing: an in-place result that differs from
// kopia's on the first content turns the in-place path off for good, and
// kopia's result is the one handed out.
func TestInPlaceDecryptionDisagreeing(t *testing.T) {
	f, err := format.NewFormattingOptionsProvider(&format.ContentFormat{
		Hash: "BLAKE2B-256-128", Encryption: "AES256-GCM-HMAC-SHA256",
		MasterKey: bytes.Repeat([]byte{7}, 32), HMACSecret: bytes.Repeat([]byte{9}, 32),
		MutableParameters: format.MutableParameters{Version: format.FormatVersion3, MaxPackSize: 20 << 20},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	d := newInPlaceDecryptor(f)
	if d == nil {
		t.Fatal("no in-place decryptor for AES256-GCM-HMAC-SHA256")
	}
	enc := makeEncryptForTest(t, f)
	iv := bytes.Repeat([]byte{3}, 16)
	packed := enc([]byte("the real bytes"), iv)
	wrong := func([]byte, []byte) ([]byte, error) { return []byte("kopia says otherwise"), nil }
	got, err := d.decrypt(bytes.Clone(packed), iv, wrong)
	if err != nil || string(got) != "kopia says otherwise" || !d.disabled.Load() {
		t.Fatalf("disagreeing first content: %q, %v, disabled %v", got, err, d.disabled.Load())
	}
	if got, _ := d.decrypt(bytes.Clone(packed), iv, wrong); string(got) != "kopia says otherwise" {
		t.Errorf("after disagreeing, the in-place path was used: %q", got)
	}
	// One that agrees is trusted, then decrypts in place.
	d = newInPlaceDecryptor(f)
	right := makeDecryptForTest(f)
	if got, err := d.decrypt(bytes.Clone(packed), iv, right); err != nil || string(got) != "the real bytes" || !d.checked.Load() {
		t.Fatalf("agreeing first content: %q, %v, checked %v", got, err, d.checked.Load())
	}
	buf := bytes.Clone(packed)
	got, err = d.decrypt(buf, iv, wrong)
	if err != nil || string(got) != "the real bytes" || &got[0] != &buf[12] {
		t.Errorf("trusted in-place decryption: %q, %v (in place: %v)", got, err, len(got) > 0 && &got[0] == &buf[12])
	}
}

func makeDecryptForTest(f format.Provider) func(ct, iv []byte) ([]byte, error) {
	return makeDecrypt(f.Encryptor().Decrypt)
}

func makeEncryptForTest(t *testing.T, f format.Provider) func(plain, iv []byte) []byte {
	enc := makeDecrypt(f.Encryptor().Encrypt) // same shape: (gather.Bytes, []byte, *gather.WriteBuffer) error
	return func(plain, iv []byte) []byte {
		out, err := enc(plain, iv)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
}
