// Command loadgen drives the API in the history benchmark: -clients goroutines,
// each sending GETs of paths read from standard input (one a line, taken at
// random) for -seconds, while one more asks -probe every 50 ms. It prints the
// latencies (seconds) of each kind as JSON. Go, so that the load generator
// costs little CPU next to the API it measures on a small machine.
package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"io"
	"math/rand"
	"net/http"
	"os"
	"strings"
	"sync"
	"time"
)

func main() {
	base := flag.String("base", "http://127.0.0.1:8090", "API base URL")
	key := flag.String("key", "", "API key")
	clients := flag.Int("clients", 50, "concurrent clients")
	seconds := flag.Float64("seconds", 20, "duration")
	probe := flag.String("probe", "/healthz", "path probed every 50 ms")
	flag.Parse()

	var paths []string
	scanner := bufio.NewScanner(os.Stdin)
	for scanner.Scan() {
		if line := strings.TrimSpace(scanner.Text()); line != "" {
			paths = append(paths, line)
		}
	}
	transport := &http.Transport{MaxIdleConns: *clients + 1, MaxIdleConnsPerHost: *clients + 1}
	client := &http.Client{Transport: transport, Timeout: 60 * time.Second}
	deadline := time.Now().Add(time.Duration(*seconds * float64(time.Second)))

	var mu sync.Mutex
	times := map[string][]float64{"list": {}, "detail": {}, "healthz": {}}
	errors := 0
	get := func(kind, path string, auth bool) {
		req, _ := http.NewRequest("GET", *base+path, nil)
		if auth {
			req.Header.Set("Authorization", "Bearer "+*key)
		}
		started := time.Now()
		resp, err := client.Do(req)
		ok := err == nil && resp.StatusCode == 200
		if err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
		}
		took := time.Since(started).Seconds()
		mu.Lock()
		times[kind] = append(times[kind], took)
		if !ok && kind != "healthz" {
			errors++
		}
		mu.Unlock()
	}

	var wg sync.WaitGroup
	for i := 0; i < *clients; i++ {
		wg.Add(1)
		go func(seed int64) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed))
			for time.Now().Before(deadline) {
				path := paths[rng.Intn(len(paths))]
				kind := "list"
				if !strings.HasSuffix(path, "/deliveries") {
					kind = "detail"
				}
				get(kind, path, true)
			}
		}(int64(i))
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for time.Now().Before(deadline) {
			get("healthz", *probe, false)
			time.Sleep(50 * time.Millisecond)
		}
	}()
	wg.Wait()
	json.NewEncoder(os.Stdout).Encode(map[string]any{"times": times, "errors": errors})
}
