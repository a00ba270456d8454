package qmp_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/thinblk/thinblk/qmp"
)

func Example() {
	dir, _ := os.MkdirTemp("", "qmp-example")
	defer os.RemoveAll(dir)
	path := filepath.Join(dir, "qmp.sock")

	srv := qmp.NewServer(qmp.Options{Version: "1.0.0"})
	srv.Register("greet", func(ctx context.Context, raw json.RawMessage) (any, error) {
		var args struct {
			Name string `json:"name"`
		}
		if err := qmp.DecodeArgs(raw, &args); err != nil {
			return nil, err
		}
		return map[string]string{"greeting": "hello " + args.Name}, nil
	})
	ln, err := srv.ListenUnix(path, 0o600)
	if err != nil {
		fmt.Println(err)
		return
	}
	go srv.Serve(context.Background(), ln)
	defer srv.Close()

	ctx := context.Background()
	c, err := qmp.Dial(ctx, path)
	if err != nil {
		fmt.Println(err)
		return
	}
	defer c.Close()
	var out struct{ Greeting string }
	err = c.Execute(ctx, "greet", map[string]string{"name": "thinblk"}, &out)
	fmt.Println(out.Greeting, err)
	err = c.Execute(ctx, "greet", map[string]int{"name": 1}, nil)
	fmt.Println(err)
	err = c.Execute(ctx, "bye", nil, nil)
	fmt.Println(err.(*qmp.Error).Class, err)
	// Output:
	// hello thinblk <nil>
	// Invalid parameter type for 'name', expected: string
	// CommandNotFound The command bye has not been found
}
