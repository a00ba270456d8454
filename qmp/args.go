package qmp

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"reflect"
	"sort"
	"strings"
)

// DecodeArgs decodes a command's arguments into v, a pointer to a struct,
// as strictly as QEMU checks its schema: an unknown member, a member of the
// wrong type, or a missing required member is a GenericError that names
// the member, and v is only written when every check passed.
//
// A struct field is required unless its json tag has omitempty (or
// omitzero); a required member may not be null. Fields are matched by
// their json tag name, exactly.
func DecodeArgs(args json.RawMessage, v any) error {
	rv := reflect.ValueOf(v)
	if rv.Kind() != reflect.Pointer || rv.IsNil() {
		return fmt.Errorf("qmp: DecodeArgs needs a non-nil pointer, got %T", v)
	}
	args = bytes.TrimSpace(args)
	if len(args) == 0 || bytes.Equal(args, []byte("null")) {
		args = []byte("{}")
	}
	if args[0] != '{' {
		return Errorf("QMP input member 'arguments' must be an object")
	}
	t := rv.Type().Elem()
	if t.Kind() != reflect.Struct {
		return decodeInto(args, v)
	}
	var members map[string]json.RawMessage
	if err := json.Unmarshal(args, &members); err != nil {
		return Errorf("invalid arguments: %v", err)
	}
	fields := structFields(t)
	var unknown []string
	for name := range members {
		if _, ok := fields[name]; !ok {
			unknown = append(unknown, name)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return Errorf("Parameter '%s' is unexpected", unknown[0])
	}
	var missing []string
	for name, required := range fields {
		if !required {
			continue
		}
		raw, ok := members[name]
		if !ok {
			missing = append(missing, name)
		} else if bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
			return Errorf("Invalid parameter type for '%s', expected: %s", name, typeName(fieldType(t, name)))
		}
	}
	if len(missing) > 0 {
		sort.Strings(missing)
		return Errorf("Parameter '%s' is missing", missing[0])
	}
	// Decode into a fresh value so that a failure leaves v untouched.
	tmp := reflect.New(t)
	if err := decodeInto(args, tmp.Interface()); err != nil {
		return err
	}
	rv.Elem().Set(tmp.Elem())
	return nil
}

func decodeInto(args []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(args))
	dec.DisallowUnknownFields()
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return argsError(err)
	}
	return nil
}

// argsError turns encoding/json's errors into QEMU-style descriptions.
func argsError(err error) error {
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		field := te.Field
		if field == "" {
			field = "arguments"
		}
		if strings.HasPrefix(te.Value, "number ") {
			// A number that does not fit the Go type.
			return Errorf("Parameter '%s' expects %s, got %s", field, typeName(te.Type), te.Value)
		}
		return Errorf("Invalid parameter type for '%s', expected: %s", field, typeName(te.Type))
	}
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return Errorf("JSON parse error, %v", se)
	}
	if name, ok := strings.CutPrefix(err.Error(), "json: unknown field "); ok {
		return Errorf("Parameter '%s' is unexpected", strings.Trim(name, `"`))
	}
	return Errorf("invalid arguments: %v", err)
}

// typeName names a Go type the way QAPI names JSON types.
func typeName(t reflect.Type) string {
	if t == nil {
		return "value"
	}
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == reflect.TypeFor[json.Number]() {
		return "number"
	}
	switch t.Kind() {
	case reflect.String:
		return "string"
	case reflect.Bool:
		return "boolean"
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64:
		return "integer"
	case reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return "unsigned integer"
	case reflect.Float32, reflect.Float64:
		return "number"
	case reflect.Slice, reflect.Array:
		return "array"
	case reflect.Struct, reflect.Map:
		return "object"
	}
	return "value"
}

// structFields maps the JSON member names of t's fields (including those
// of embedded structs, as encoding/json does) to whether they are required.
func structFields(t reflect.Type) map[string]bool {
	fields := make(map[string]bool)
	var walk func(t reflect.Type)
	walk = func(t reflect.Type) {
		for i := range t.NumField() {
			f := t.Field(i)
			tag := f.Tag.Get("json")
			if tag == "-" {
				continue
			}
			name, opts, _ := strings.Cut(tag, ",")
			ft := f.Type
			if ft.Kind() == reflect.Pointer {
				ft = ft.Elem()
			}
			if f.Anonymous && name == "" && ft.Kind() == reflect.Struct {
				walk(ft)
				continue
			}
			if !f.IsExported() {
				continue
			}
			if name == "" {
				name = f.Name
			}
			optional := false
			for o := range strings.SplitSeq(opts, ",") {
				if o == "omitempty" || o == "omitzero" {
					optional = true
				}
			}
			fields[name] = !optional
		}
	}
	walk(t)
	return fields
}

// fieldType finds the type of the field with JSON name name.
func fieldType(t reflect.Type, name string) reflect.Type {
	for i := range t.NumField() {
		f := t.Field(i)
		tag, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		ft := f.Type
		if ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		if f.Anonymous && tag == "" && ft.Kind() == reflect.Struct {
			if r := fieldType(ft, name); r != nil {
				return r
			}
			continue
		}
		if tag == name || tag == "" && f.Name == name {
			return f.Type
		}
	}
	return nil
}
