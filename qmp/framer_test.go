package qmp

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"unicode/utf8"
)

type frame struct {
	msg string
	err error
}

func frameAll(f *framer, chunks ...string) []frame {
	var out []frame
	for _, c := range chunks {
		f.feed([]byte(c), func(msg []byte, err error) {
			out = append(out, frame{string(msg), err})
		})
	}
	return out
}

func newFramer() *framer { return &framer{max: 64, maxDepth: 4} }

func TestFramer(t *testing.T) {
	cases := []struct {
		in   string
		want []frame
	}{
		{`{"a":1}{"b":2}`, []frame{{msg: `{"a":1}`}, {msg: `{"b":2}`}}},
		{" \r\n\t{ \"a\" : [ 1 , 2 ] }\n", []frame{{msg: `{ "a" : [ 1 , 2 ] }`}}},
		{`{"s":"}{][\"\\"}`, []frame{{msg: `{"s":"}{][\"\\"}`}}},
		{`42 true"str"null{}`, []frame{{msg: `42`}, {msg: `true`}, {msg: `"str"`}, {msg: `null`}, {msg: `{}`}}},
		{`]}{]`, []frame{{msg: `]`}, {msg: `}`}, {msg: `{]`}}},
		{"{\"a\":\x01{}", []frame{{err: lexicalError{1}}, {msg: `{}`}}},
		{"\xff[1]", []frame{{err: lexicalError{0xff}}, {msg: `[1]`}}},
		// Multi-byte UTF-8 passes through.
		{`["ü€𝄞"]`, []frame{{msg: `["ü€𝄞"]`}}},
		// Too large: reported once, the rest skipped, then in sync again.
		{`{"a":"` + strings.Repeat("x", 100) + `","b":[{}]}{"ok":1}`, []frame{{err: errTooLarge}, {msg: `{"ok":1}`}}},
		{strings.Repeat("9", 100) + ` {}`, []frame{{err: errTooLarge}, {msg: `{}`}}},
		{`"` + strings.Repeat("s", 100) + `"{}`, []frame{{err: errTooLarge}, {msg: `{}`}}},
		// Too deep, also counting depth past the limit while skipping.
		{`[[[[[[[]]]]]]]{}`, []frame{{err: errTooDeep}, {msg: `{}`}}},
		{`[[[[]]]]`, []frame{{msg: `[[[[]]]]`}}},
		// A lexical error ends skipping too: that is how a client resyncs.
		{`[[[[[[` + "\x01" + `{}`, []frame{{err: errTooDeep}, {err: lexicalError{1}}, {msg: `{}`}}},
	}
	for _, tc := range cases {
		if got := frameAll(newFramer(), tc.in); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%q:\n got %v\nwant %v", tc.in, got, tc.want)
		}
		// Byte by byte gives the same result.
		var chunks []string
		for i := range len(tc.in) {
			chunks = append(chunks, tc.in[i:i+1])
		}
		if got := frameAll(newFramer(), chunks...); !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%q byte by byte:\n got %v\nwant %v", tc.in, got, tc.want)
		}
	}
}

// TestFramerMemoryBounded feeds an endless unterminated message and checks
// that the framer keeps no more than its limit.
func TestFramerMemoryBounded(t *testing.T) {
	f := &framer{max: 1 << 20, maxDepth: 1024}
	chunk := []byte(`{"a":[` + strings.Repeat(`"xxxxxxxxxxxxxxxx",`, 4000))
	errs := 0
	for range 200 { // about 15 MB
		f.feed(chunk, func(msg []byte, err error) {
			if err != errTooLarge {
				t.Fatalf("unexpected %q %v", msg, err)
			}
			errs++
		})
		if cap(f.buf) > f.max+f.max/2 {
			t.Fatalf("buffer grew to %d", cap(f.buf))
		}
	}
	if errs != 1 || !f.pending() {
		t.Fatalf("errs %d pending %v", errs, f.pending())
	}
	// A big message's buffer is not kept once it ends.
	f.reset()
	frameAll(f, `["`+strings.Repeat("y", 500<<10)+`"]`)
	if cap(f.buf) > keepCap {
		t.Fatalf("buffer of %d bytes kept after the message", cap(f.buf))
	}
}

// checkFramed checks the framer's invariants on input in: chunking does
// not matter, messages are bounded, and every message that is valid JSON
// is a single value.
func checkFramed(t *testing.T, in []byte, split int) {
	f1 := &framer{max: 256, maxDepth: 8}
	whole := frameAll(f1, string(in))
	if split > len(in) {
		split = len(in)
	}
	f2 := &framer{max: 256, maxDepth: 8}
	parts := frameAll(f2, string(in[:split]), string(in[split:]))
	if !reflect.DeepEqual(whole, parts) {
		t.Fatalf("split at %d changes the frames:\n%v\n%v", split, whole, parts)
	}
	for _, fr := range whole {
		if fr.err != nil {
			continue
		}
		if len(fr.msg) == 0 || len(fr.msg) > 256 {
			t.Fatalf("frame of %d bytes", len(fr.msg))
		}
		if json.Valid([]byte(fr.msg)) {
			var v any
			dec := json.NewDecoder(strings.NewReader(fr.msg))
			if err := dec.Decode(&v); err != nil || dec.More() {
				t.Fatalf("frame %q is not one value", fr.msg)
			}
		}
	}
}

func FuzzFramer(f *testing.F) {
	for _, s := range []string{
		`{"execute":"qmp_capabilities"}`,
		`{"execute":"x","arguments":{"a":[1,2,{"b":"\"}"}]},"id":1}{"execute":"y"}`,
		`42 "s" true null ] } {`,
		"\x01{\xff[\"\\",
		`[[[[[[[[[[[[]]]]]]]]]]]]{}`,
		`"` + strings.Repeat("a", 300) + `"{}`,
		`{"a":"ü€𝄞"}`,
	} {
		f.Add([]byte(s), 5)
	}
	f.Fuzz(func(t *testing.T, in []byte, split int) {
		if split < 0 {
			split = -split
		}
		checkFramed(t, in, split%(len(in)+1))
	})
}

func FuzzParseRequest(f *testing.F) {
	for _, s := range []string{
		`{"execute":"qmp_capabilities"}`,
		`{"execute":"x","arguments":{"a":1},"id":[1,{"b":null}]}`,
		`{"exec-oob":"x","id":1}`,
		`{"execute":7}`,
		`{"execute":"x","arguments":null}`,
		`{"id":"only"}`,
		`[]`, `42`, `{`, `{"execute":"x",}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, msg []byte) {
		id, name, args, qerr := parseRequest(msg)
		if id != nil && !json.Valid(id) {
			t.Fatalf("id %q is not JSON", id)
		}
		if qerr != nil {
			if qerr.Class != ClassGenericError || qerr.Desc == "" {
				t.Fatalf("error %+v", qerr)
			}
			if _, err := encode(errorReply{Error: qerr, ID: id}); err != nil {
				t.Fatalf("error reply cannot be encoded: %v", err)
			}
			return
		}
		if !json.Valid(msg) || !json.Valid(args) || args[0] != '{' {
			t.Fatalf("accepted %q with args %q", msg, args)
		}
		var m map[string]json.RawMessage
		json.Unmarshal(msg, &m)
		var exec string
		if json.Unmarshal(m["execute"], &exec) != nil || exec != name {
			t.Fatalf("name %q from %q", name, msg)
		}
	})
}

func FuzzASCIIJSON(f *testing.F) {
	for _, s := range []string{`"plain"`, `"ü€𝄞"`, "\"\xff\xfe\"", `{"k":"\u2028"}`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		b, err := json.Marshal(map[string]string{s: s})
		if err != nil {
			t.Fatal(err)
		}
		out := asciiJSON(b)
		for _, c := range out {
			if c >= utf8.RuneSelf {
				t.Fatalf("non-ASCII output %q", out)
			}
		}
		var a, b2 map[string]string
		if err := json.Unmarshal(b, &a); err != nil {
			t.Fatal(err)
		}
		if err := json.Unmarshal(out, &b2); err != nil {
			t.Fatalf("%q: %v", out, err)
		}
		if !reflect.DeepEqual(a, b2) {
			t.Fatalf("asciiJSON changed the value: %q -> %q", b, out)
		}
	})
}
