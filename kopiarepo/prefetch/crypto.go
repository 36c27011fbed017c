package prefetch

import (
	"bytes"
	"crypto/aes"
	"errors"
	"fmt"
	"reflect"

	"github.com/kopia/kopia/repo/compression"
	"github.com/kopia/kopia/repo/content"
	"github.com/kopia/kopia/repo/format"
)

// contentCodec turns the packed bytes of a content, as stored in its pack
// blob, into the content's data, the way kopia's content manager does
// (SharedManager.decryptContentAndVerify in repo/content v0.22.3), and
// verifies them:
//
//  1. decrypt with the repository's encryptor, the IV being the last 16
//     bytes of the content ID's hash (getPackedContentIV). kopia's
//     encryptions (AES256-GCM-HMAC-SHA256, CHACHA20-POLY1305-HMAC-SHA256)
//     are authenticated, with a key derived from the content ID: a packed
//     content that was altered, or that belongs to another content ID,
//     fails to decrypt. This is the check kopia itself relies on when it
//     reads a content ("already verified" after Decrypt).
//  2. decompress when the index says the content is compressed.
//  3. only where the decryption in step 1 does not bind the bytes to the
//     content ID (an encryption other than kopia's two authenticated ones)
//     or when asked (Options.VerifyHash): hash the data with the
//     repository's hash function and compare it with the content ID.
//
// Step 1 is the verification against the content ID: the key that
// authenticates a content is HMAC-SHA256 of the repository's secret and
// the content ID's hash (its last 16 bytes, all of them for kopia's
// default BLAKE2B-256-128), so bytes that were altered, truncated or
// belong to another content fail it. Hashing the data again (step 3)
// would cost a second pass over every byte — about 1.1 s of CPU per GiB
// on this kind of machine, a third of a restore's CPU — for a guarantee
// step 1 already gives; it stays available for a repository whose
// encryption is not known to authenticate, and as an option.
//
// kopia exports the encryptor and hash function (format.Provider) but
// their signatures use types of its internal "gather" package, which
// vmhistory cannot import. The functions below are generic over those
// types, which Go infers from the method values, and fill the one
// exported field of gather.Bytes (Slices) by reflection. Any mismatch
// (a kopia upgrade changing these types) is caught at construction, and
// any wrong result by step 3; the reader then falls back to kopia's own
// object reader.
type contentCodec struct {
	decrypt func(ciphertext, iv []byte) ([]byte, error)
	hash    func(data []byte) []byte
	// verifyHash makes decode hash every content (step 3).
	verifyHash bool
	// inPlace, when set, decrypts in the packed bytes' own buffer (see
	// inPlaceDecryptor); decode then overwrites them.
	inPlace *inPlaceDecryptor
}

// authenticatedEncryptions are kopia's encryptions whose Decrypt
// authenticates each content with a key derived from its content ID
// (repo/encryption: aeadForContent in both).
var authenticatedEncryptions = map[string]bool{
	"AES256-GCM-HMAC-SHA256":        true,
	"CHACHA20-POLY1305-HMAC-SHA256": true,
}

var errUnsupportedContent = errors.New("content format not supported by the pack reader")

// newContentCodec returns the codec for a repository's content format;
// verifyHash hashes every content even where decryption authenticates it.
func newContentCodec(f format.Provider, verifyHash bool) (c *contentCodec, err error) {
	defer func() {
		if r := recover(); r != nil {
			c, err = nil, fmt.Errorf("kopia content format not usable directly: %v", r)
		}
	}()
	enc := f.Encryptor()
	hf := f.HashFunc()
	if enc == nil || hf == nil {
		return nil, errors.New("repository has no encryptor or hash function")
	}
	c = &contentCodec{decrypt: makeDecrypt(enc.Decrypt), hash: makeHash(hf),
		verifyHash: verifyHash || !authenticatedEncryptions[f.GetEncryptionAlgorithm()],
		inPlace:    newInPlaceDecryptor(f)}
	return c, nil
}

// gatherBytesOf builds a gather.Bytes (type B) over one slice.
func gatherBytesOf[B any](data []byte) B {
	var b B
	v := reflect.ValueOf(&b).Elem()
	f := v.FieldByName("Slices")
	if !f.IsValid() || f.Type() != reflect.TypeFor[[][]byte]() {
		panic(fmt.Sprintf("%v has no field Slices [][]byte", v.Type()))
	}
	f.Set(reflect.ValueOf([][]byte{data}))
	return b
}

type writeBuffer interface {
	ToByteSlice() []byte
	Close()
}

func makeDecrypt[B any, W any](dec func(B, []byte, *W) error) func(ciphertext, iv []byte) ([]byte, error) {
	// Probe the types once so that a mismatch fails construction.
	_ = gatherBytesOf[B](nil)
	var probe W
	if _, ok := any(&probe).(writeBuffer); !ok {
		panic(fmt.Sprintf("%T has no ToByteSlice/Close", &probe))
	}
	return func(ciphertext, iv []byte) ([]byte, error) {
		var w W
		wb := any(&w).(writeBuffer) //nolint:forcetypeassert
		defer wb.Close()
		if err := dec(gatherBytesOf[B](ciphertext), iv, &w); err != nil {
			return nil, err
		}
		return wb.ToByteSlice(), nil
	}
}

func makeHash[B any](h func([]byte, B) []byte) func(data []byte) []byte {
	_ = gatherBytesOf[B](nil)
	return func(data []byte) []byte {
		return h(nil, gatherBytesOf[B](data))
	}
}

// decode returns the data of content info from its packed bytes,
// verified. It may decrypt in place: packed's bytes are then overwritten,
// and the result is a part of packed.
func (c *contentCodec) decode(packed []byte, info content.Info) ([]byte, error) {
	if info.EncryptionKeyID != 0 {
		return nil, fmt.Errorf("%w: encryption key ID %d", errUnsupportedContent, info.EncryptionKeyID)
	}
	h := info.ContentID.Hash()
	if len(h) < aes.BlockSize {
		return nil, fmt.Errorf("%w: content ID hash of %d bytes", errUnsupportedContent, len(h))
	}
	iv := h[len(h)-aes.BlockSize:]
	var plain []byte
	var err error
	if c.inPlace != nil {
		plain, err = c.inPlace.decrypt(packed, iv, c.decrypt)
	} else {
		plain, err = c.decrypt(packed, iv)
	}
	if err != nil {
		return nil, &CorruptError{Content: info.ContentID.String(), Err: fmt.Errorf("decrypt: %w", err)}
	}
	if hid := info.CompressionHeaderID; hid != 0 {
		comp := compression.ByHeaderID[hid]
		if comp == nil {
			return nil, fmt.Errorf("%w: compressor %x", errUnsupportedContent, hid)
		}
		var out bytes.Buffer
		out.Grow(int(info.OriginalLength))
		if err := comp.Decompress(&out, bytes.NewReader(plain), true); err != nil {
			return nil, &CorruptError{Content: info.ContentID.String(), Err: fmt.Errorf("decompress: %w", err)}
		}
		plain = out.Bytes()
	}
	if !c.verifyHash {
		return plain, nil
	}
	if got := c.hash(plain); !bytes.Equal(got, h) {
		return nil, &CorruptError{Content: info.ContentID.String(), Err: errors.New("data does not match the content hash")}
	}
	return plain, nil
}

// CorruptError reports a content whose bytes failed verification.
type CorruptError struct {
	Content string
	Err     error
}

func (e *CorruptError) Error() string {
	return "content " + e.Content + " failed verification: " + e.Err.Error()
}
func (e *CorruptError) Unwrap() error { return e.Err }
