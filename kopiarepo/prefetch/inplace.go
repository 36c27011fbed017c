package prefetch

import (
	"bytes"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"sync"
	"sync/atomic"

	"golang.org/x/crypto/chacha20poly1305"

	"github.com/kopia/kopia/repo/format"
)

// inPlaceDecryptor opens kopia's authenticated encryptions in place, in
// the pack range's own buffer: kopia's Decrypt (aeadOpenPrefixedWithNonce
// in repo/encryption v0.22.3) copies the packed bytes into a scratch
// buffer, opens them there, copies the result into a gather buffer, which
// the codec then copies into a slice of its own — three copies of every
// byte a restore reads, a quarter of its CPU on a local repository.
//
// It derives the keys as kopia does: the key-derivation secret is
// HKDF-SHA256 of the repository's master key with salt "encryption", the
// key of a content HMAC-SHA256 of that secret over the content's IV (the
// last 16 bytes of its hash, also the AEAD's additional data), the
// ciphertext [12-byte nonce][sealed data and 16-byte tag]. Until its first
// result has been found equal to kopia's own Decrypt of the same bytes
// (checked), the codec does not use it; a mismatch turns it off for good.
type inPlaceDecryptor struct {
	newAEAD  func(key []byte) (cipher.AEAD, error)
	hmacPool sync.Pool

	checked  atomic.Bool
	disabled atomic.Bool
	checkMu  sync.Mutex
}

// newInPlaceDecryptor returns nil for a format it does not know: another
// encryption, or error correction (ECC), which wraps the ciphertext.
func newInPlaceDecryptor(f format.Provider) *inPlaceDecryptor {
	if f.GetECCAlgorithm() != "" && f.GetECCOverheadPercent() > 0 {
		return nil
	}
	d := &inPlaceDecryptor{}
	switch f.GetEncryptionAlgorithm() {
	case "AES256-GCM-HMAC-SHA256":
		d.newAEAD = func(key []byte) (cipher.AEAD, error) {
			b, err := aes.NewCipher(key)
			if err != nil {
				return nil, err
			}
			return cipher.NewGCM(b)
		}
	case "CHACHA20-POLY1305-HMAC-SHA256":
		d.newAEAD = chacha20poly1305.New
	default:
		return nil
	}
	secret, err := hkdf.Key(sha256.New, f.GetMasterKey(), []byte("encryption"), "", 32)
	if err != nil {
		return nil
	}
	d.hmacPool.New = func() any { return hmac.New(sha256.New, secret) }
	return d
}

// open decrypts packed in place and returns the plaintext, a subslice of
// packed (whose bytes it overwrites).
func (d *inPlaceDecryptor) open(packed, iv []byte) ([]byte, error) {
	h := d.hmacPool.Get().(hash.Hash) //nolint:forcetypeassert
	h.Reset()
	h.Write(iv)
	var keyBuf [sha256.Size]byte
	key := h.Sum(keyBuf[:0])
	d.hmacPool.Put(h)
	a, err := d.newAEAD(key)
	if err != nil {
		return nil, err
	}
	if len(packed) < a.NonceSize()+a.Overhead() {
		return nil, fmt.Errorf("ciphertext too short: %d bytes", len(packed))
	}
	nonce, sealed := packed[:a.NonceSize()], packed[a.NonceSize():]
	return a.Open(sealed[:0], nonce, sealed, iv)
}

var errInPlaceMismatch = errors.New("in-place decryption differs from kopia's")

// decrypt opens packed with the in-place decryptor once it is known to
// agree with kopia's, and with kopia's otherwise; the first call compares
// the two. kopiaDecrypt does not change packed.
func (d *inPlaceDecryptor) decrypt(packed, iv []byte, kopiaDecrypt func(ciphertext, iv []byte) ([]byte, error)) ([]byte, error) {
	if d.disabled.Load() {
		return kopiaDecrypt(packed, iv)
	}
	if d.checked.Load() {
		return d.open(packed, iv)
	}
	d.checkMu.Lock()
	defer d.checkMu.Unlock()
	if d.checked.Load() {
		return d.open(packed, iv)
	}
	want, err := kopiaDecrypt(packed, iv)
	if err != nil {
		return nil, err
	}
	got, err := d.open(bytes.Clone(packed), iv)
	if err != nil || !bytes.Equal(got, want) {
		d.disabled.Store(true)
		return want, nil
	}
	d.checked.Store(true)
	return want, nil
}
