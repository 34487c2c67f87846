// Command receiver is the benchmark's webhook endpoint: an HTTPS server on
// several loopback ports (each port is a distinct endpoint to the dispatcher)
// that answers every POST at once with 204, except under /stall/, where it
// answers only when released or shut down, and under /delay/MS/, where it
// answers after MS milliseconds. It records the arrival time of every POST per
// path, and counts those whose X-Bullseye-Attempt header says they are not a
// delivery's first attempt; under /lat/ it also records the latency from the moment encoded in the
// body's session_id ("lat_<unix ns>_...") to the arrival. A plain-HTTP control
// port reports counts, rates, latencies and connections:
//
//	GET  /count                          {"total": n, "paths": {"/ok/0": n, ...},
//	                                      "conns_opened": n, "conns_open": n,
//	                                      "later_attempts": {"/ok/0": n, ...}}
//	GET  /latency                        {"count": n, "p50_ms": ..., "p95_ms": ...,
//	                                      "p99_ms": ..., "max_ms": ...}
//	GET  /window?prefix=/ok/&skip=W&tail=T
//	     arrivals under the prefix, sorted, the first W and last T dropped:
//	     {"count": all, "used": k, "seconds": t, "rate": (k-1)/t}
//	POST /reset                          forget every arrival
//	POST /release                        answer the stalled requests
//
// Standard library only. Its chosen ports are printed as one JSON line on stdout.
package main

import (
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

type recorder struct {
	mu          sync.Mutex
	start       time.Time
	times       map[string][]int64
	later       map[string]int
	latencies   []int64
	release     chan struct{}
	connsOpened int
	connsOpen   int
}

func newRecorder() *recorder {
	return &recorder{start: time.Now(), times: map[string][]int64{}, later: map[string]int{}, release: make(chan struct{})}
}

// connState counts connections as they open and close (idle ones included).
func (r *recorder) connState(_ net.Conn, state http.ConnState) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch state {
	case http.StateNew:
		r.connsOpened++
		r.connsOpen++
	case http.StateClosed, http.StateHijacked:
		r.connsOpen--
	}
}

// recordLatency takes the produce time from a body's session_id, "lat_<unix ns>_...".
func (r *recorder) recordLatency(body []byte, arrived time.Time) {
	var doc struct {
		SessionID string `json:"session_id"`
	}
	if json.Unmarshal(body, &doc) != nil || !strings.HasPrefix(doc.SessionID, "lat_") {
		return
	}
	stamp, _, _ := strings.Cut(strings.TrimPrefix(doc.SessionID, "lat_"), "_")
	produced, err := strconv.ParseInt(stamp, 10, 64)
	if err != nil {
		return
	}
	r.mu.Lock()
	r.latencies = append(r.latencies, arrived.UnixNano()-produced)
	r.mu.Unlock()
}

func (r *recorder) record(path string, attempt string) {
	now := time.Since(r.start).Nanoseconds()
	r.mu.Lock()
	r.times[path] = append(r.times[path], now)
	// A retry of a delivery, not a new one: an endpoint's share of them says
	// whether its deliveries needed more than one attempt.
	if attempt != "" && attempt != "1" {
		r.later[path]++
	}
	r.mu.Unlock()
}

func (r *recorder) stalled() chan struct{} {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.release
}

func (r *recorder) serveHook(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost {
		http.Error(w, "POST only", http.StatusMethodNotAllowed)
		return
	}
	// The whole body is read, as a real receiver verifying a signature would.
	body, err := io.ReadAll(req.Body)
	if err != nil {
		return
	}
	arrived := time.Now()
	r.record(req.URL.Path, req.Header.Get("X-Bullseye-Attempt"))
	path := req.URL.Path
	switch {
	case strings.HasPrefix(path, "/stall/"):
		select {
		case <-r.stalled():
		case <-req.Context().Done():
			return
		}
	case strings.HasPrefix(path, "/delay/"):
		ms, _, _ := strings.Cut(strings.TrimPrefix(path, "/delay/"), "/")
		if n, err := strconv.Atoi(ms); err == nil {
			select {
			case <-time.After(time.Duration(n) * time.Millisecond):
			case <-req.Context().Done():
				return
			}
		}
	case strings.HasPrefix(path, "/lat/"):
		r.recordLatency(body, arrived)
	}
	w.WriteHeader(http.StatusNoContent)
}

func (r *recorder) serveControl(w http.ResponseWriter, req *http.Request) {
	switch {
	case req.URL.Path == "/count" && req.Method == http.MethodGet:
		r.mu.Lock()
		paths := make(map[string]int, len(r.times))
		total := 0
		for p, ts := range r.times {
			paths[p] = len(ts)
			total += len(ts)
		}
		later := make(map[string]int, len(r.later))
		for p, n := range r.later {
			later[p] = n
		}
		opened, open := r.connsOpened, r.connsOpen
		r.mu.Unlock()
		writeJSON(w, map[string]any{
			"total": total, "paths": paths, "conns_opened": opened, "conns_open": open,
			"later_attempts": later,
		})
	case req.URL.Path == "/latency" && req.Method == http.MethodGet:
		r.mu.Lock()
		all := append([]int64(nil), r.latencies...)
		r.mu.Unlock()
		sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
		out := map[string]any{"count": len(all)}
		if len(all) > 0 {
			at := func(q float64) float64 {
				return float64(all[int(q*float64(len(all)-1))]) / 1e6
			}
			out["p50_ms"], out["p95_ms"], out["p99_ms"], out["max_ms"] = at(0.5), at(0.95), at(0.99), at(1)
		}
		writeJSON(w, out)
	case req.URL.Path == "/window" && req.Method == http.MethodGet:
		q := req.URL.Query()
		prefix := q.Get("prefix")
		skip, _ := strconv.Atoi(q.Get("skip"))
		tail, _ := strconv.Atoi(q.Get("tail"))
		var all []int64
		r.mu.Lock()
		for p, ts := range r.times {
			if strings.HasPrefix(p, prefix) {
				all = append(all, ts...)
			}
		}
		r.mu.Unlock()
		sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
		out := map[string]any{"count": len(all), "used": 0, "seconds": 0.0, "rate": 0.0}
		if skip >= 0 && tail >= 0 && len(all)-skip-tail >= 2 {
			used := all[skip : len(all)-tail]
			seconds := float64(used[len(used)-1]-used[0]) / 1e9
			out["used"] = len(used)
			out["seconds"] = seconds
			if seconds > 0 {
				out["rate"] = float64(len(used)-1) / seconds
			}
		}
		writeJSON(w, out)
	case req.URL.Path == "/reset" && req.Method == http.MethodPost:
		r.mu.Lock()
		r.times = map[string][]int64{}
		r.later = map[string]int{}
		r.latencies = nil
		r.connsOpened = 0
		r.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	case req.URL.Path == "/release" && req.Method == http.MethodPost:
		r.mu.Lock()
		close(r.release)
		r.release = make(chan struct{})
		r.mu.Unlock()
		w.WriteHeader(http.StatusNoContent)
	default:
		http.NotFound(w, req)
	}
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(v); err != nil {
		log.Printf("control: %v", err)
	}
}

func listen() net.Listener {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatalf("listen: %v", err)
	}
	return ln
}

func main() {
	certFile := flag.String("cert", "", "PEM certificate chain")
	keyFile := flag.String("key", "", "PEM private key")
	ports := flag.Int("ports", 1, "number of HTTPS ports (endpoints)")
	flag.Parse()
	if *certFile == "" || *keyFile == "" || *ports < 1 {
		fmt.Fprintln(os.Stderr, "usage: receiver -cert FILE -key FILE [-ports N]")
		os.Exit(2)
	}
	cert, err := tls.LoadX509KeyPair(*certFile, *keyFile)
	if err != nil {
		log.Fatalf("certificate: %v", err)
	}
	rec := newRecorder()
	hooks := http.HandlerFunc(rec.serveHook)
	var servers []*http.Server
	var hookPorts []int
	for i := 0; i < *ports; i++ {
		ln := listen()
		hookPorts = append(hookPorts, ln.Addr().(*net.TCPAddr).Port)
		srv := &http.Server{
			Handler:   hooks,
			ConnState: rec.connState,
			// HTTP/1.1 only, like the dispatcher's client: an empty map turns off h2.
			TLSNextProto: map[string]func(*http.Server, *tls.Conn, http.Handler){},
			TLSConfig:    &tls.Config{Certificates: []tls.Certificate{cert}},
			IdleTimeout:  60 * time.Second,
			ErrorLog:     log.New(io.Discard, "", 0),
		}
		servers = append(servers, srv)
		go func() {
			if err := srv.ServeTLS(ln, "", ""); err != http.ErrServerClosed {
				log.Fatalf("serve: %v", err)
			}
		}()
	}
	control := listen()
	ctl := &http.Server{Handler: http.HandlerFunc(rec.serveControl)}
	go func() {
		if err := ctl.Serve(control); err != http.ErrServerClosed {
			log.Fatalf("control: %v", err)
		}
	}()
	line, _ := json.Marshal(map[string]any{
		"ports":   hookPorts,
		"control": control.Addr().(*net.TCPAddr).Port,
	})
	fmt.Println(string(line))

	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	<-stop
	// Stalled requests are let go, so their clients see an answer, not a reset.
	rec.mu.Lock()
	close(rec.release)
	rec.release = make(chan struct{})
	rec.mu.Unlock()
	for _, srv := range servers {
		_ = srv.Close()
	}
	_ = ctl.Close()
}
