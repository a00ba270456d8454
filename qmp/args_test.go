package qmp

import (
	"encoding/json"
	"errors"
	"reflect"
	"strings"
	"testing"
)

type Inner struct {
	Depth int `json:"depth"`
}

type createArgs struct {
	Name     string            `json:"name"`
	Size     uint64            `json:"size"`
	Writable *bool             `json:"writable,omitempty"`
	Tags     []string          `json:"tags,omitempty"`
	Opts     map[string]string `json:"opts,omitzero"`
	Ratio    float64           `json:"ratio,omitempty"`
	Child    *Inner            `json:"child,omitempty"`
	Inner                      // embedded: its members are top-level
	internal int
}

func TestDecodeArgs(t *testing.T) {
	tr := true
	good := []struct {
		in   string
		want createArgs
	}{
		{`{"name":"v","size":5,"depth":1}`, createArgs{Name: "v", Size: 5, Inner: Inner{1}}},
		{`{"name":"v","size":5,"depth":1,"writable":true,"tags":["a"],"opts":{"k":"x"},"ratio":0.5,"child":{"depth":2}}`,
			createArgs{Name: "v", Size: 5, Inner: Inner{1}, Writable: &tr, Tags: []string{"a"}, Opts: map[string]string{"k": "x"}, Ratio: 0.5, Child: &Inner{2}}},
		{` {"name":"","size":0,"depth":0,"writable":null} `, createArgs{}},
	}
	for _, tc := range good {
		var got createArgs
		if err := DecodeArgs(json.RawMessage(tc.in), &got); err != nil {
			t.Errorf("%s: %v", tc.in, err)
		} else if !reflect.DeepEqual(got, tc.want) {
			t.Errorf("%s: got %+v want %+v", tc.in, got, tc.want)
		}
	}
	bad := []struct{ in, desc string }{
		{`{"size":5,"depth":1}`, "Parameter 'name' is missing"},
		{`{"name":"v","depth":1}`, "Parameter 'size' is missing"},
		{`{"name":null,"size":5,"depth":1}`, "Invalid parameter type for 'name', expected: string"},
		{`{"name":"v","size":5,"depth":1,"x":1}`, "Parameter 'x' is unexpected"},
		{`{"Name":"v","size":5,"depth":1}`, "Parameter 'Name' is unexpected"},
		{`{"name":"v","size":5,"depth":1,"internal":1}`, "Parameter 'internal' is unexpected"},
		{`{"name":1,"size":5,"depth":1}`, "Invalid parameter type for 'name', expected: string"},
		{`{"name":"v","size":"5","depth":1}`, "Invalid parameter type for 'size', expected: unsigned integer"},
		{`{"name":"v","size":-1,"depth":1}`, "Parameter 'size' expects unsigned integer, got number -1"},
		{`{"name":"v","size":1.5,"depth":1}`, "Parameter 'size' expects unsigned integer, got number 1.5"},
		{`{"name":"v","size":5,"depth":1,"writable":"yes"}`, "Invalid parameter type for 'writable', expected: boolean"},
		{`{"name":"v","size":5,"depth":1,"tags":"a"}`, "Invalid parameter type for 'tags', expected: array"},
		{`{"name":"v","size":5,"depth":1,"tags":[1]}`, "Invalid parameter type for 'tags', expected: string"},
		{`{"name":"v","size":5,"depth":1,"child":{"depth":"x"}}`, "Invalid parameter type for 'child.depth', expected: integer"},
		{`{"name":"v","size":5,"depth":1,"child":{"zz":1}}`, "Parameter 'zz' is unexpected"},
		{`{"name":"v","size":5,"depth":1,"child":7}`, "Invalid parameter type for 'child', expected: object"},
		{`[1]`, "must be an object"},
		{`{"name":"v",`, "invalid arguments"},
	}
	for _, tc := range bad {
		v := createArgs{Name: "untouched"}
		err := DecodeArgs(json.RawMessage(tc.in), &v)
		var qe *Error
		if !errors.As(err, &qe) || qe.Class != ClassGenericError || !strings.Contains(qe.Desc, tc.desc) {
			t.Errorf("%s: got %v, want %q", tc.in, err, tc.desc)
		}
		if v.Name != "untouched" || v.Size != 0 {
			t.Errorf("%s: failed decode wrote %+v", tc.in, v)
		}
	}
	// No arguments at all is an empty object.
	var opt struct {
		A int `json:"a,omitempty"`
	}
	if err := DecodeArgs(nil, &opt); err != nil {
		t.Fatal(err)
	}
	if err := DecodeArgs(nil, &createArgs{}); err == nil || !strings.Contains(err.Error(), "Parameter 'depth' is missing") {
		t.Fatalf("missing required members: %v", err)
	}
	// Maps are decoded as they are.
	var m map[string]int
	if err := DecodeArgs(json.RawMessage(`{"a":1}`), &m); err != nil || m["a"] != 1 {
		t.Fatalf("map: %v %v", m, err)
	}
	if err := DecodeArgs(json.RawMessage(`{"a":"x"}`), &m); err == nil {
		t.Fatal("map with a wrong value type accepted")
	}
	if err := DecodeArgs(json.RawMessage(`{}`), createArgs{}); err == nil {
		t.Fatal("non-pointer accepted")
	}
}

func FuzzDecodeArgs(f *testing.F) {
	for _, s := range []string{
		`{"name":"v","size":5,"depth":1}`,
		`{"name":"v","size":5,"depth":1,"writable":true,"tags":["a"],"opts":{"k":"x"},"ratio":0.5,"child":{"depth":2}}`,
		`{"name":null}`, `[]`, `{"x":1}`, `{"size":-1}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, in []byte) {
		var v createArgs
		err := DecodeArgs(in, &v)
		if err != nil {
			var qe *Error
			if !errors.As(err, &qe) || qe.Desc == "" {
				t.Fatalf("%q: error %v is not a QMP error", in, err)
			}
			if !reflect.DeepEqual(v, createArgs{}) {
				t.Fatalf("%q: failed decode wrote %+v", in, v)
			}
		}
	})
}
