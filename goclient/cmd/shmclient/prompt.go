package main

import (
	"context"
	"fmt"
	"io"
	"time"
)

const promptSummary = `Generate text from TEXT with at most -steps new tokens and print it. With
-stream, print each chunk as the model produces it.`

func runPrompt(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := newFlagSet("prompt", "[flags] TEXT", promptSummary, stderr)
	var conn connectionFlags
	conn.register(fs, 5*time.Minute, "gemma")
	steps := fs.Int("steps", 64, "most tokens to generate (the server's sampling_steps)")
	stream := fs.Bool("stream", false, "print chunks as they are generated")
	if err := parseArgs(fs, args, 1, 1); err != nil {
		return err
	}
	ctx, client, closeClient, err := conn.connect(ctx, 1, stderr)
	if err != nil {
		return err
	}
	defer closeClient()
	ctx, cancel := context.WithTimeout(ctx, conn.timeout)
	defer cancel()
	if !*stream {
		text, err := client.Prompt(ctx, fs.Arg(0), *steps)
		if err != nil {
			return err
		}
		fmt.Fprintln(stdout, text)
		return nil
	}
	err = client.PromptStream(ctx, fs.Arg(0), *steps, func(chunk string) error {
		_, err := io.WriteString(stdout, chunk)
		return err
	})
	fmt.Fprintln(stdout)
	return err
}
