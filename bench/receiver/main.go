// Command receiver is the benchmark's webhook endpoint: an HTTPS server on
// several loopback ports (each port is a distinct endpoint to the dispatcher)
// that answers every POST at once with 204, except under /stall/, where it
// answers only when released or shut down. It records the arrival time of every
// POST per path, and a plain-HTTP control port reports counts and rates:
//
//	GET  /count                          {"total": n, "paths": {"/ok/0": n, ...}}
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
	mu      sync.Mutex
	start   time.Time
	times   map[string][]int64
	release chan struct{}
}

func newRecorder() *recorder {
	return &recorder{start: time.Now(), times: map[string][]int64{}, release: make(chan struct{})}
}

func (r *recorder) record(path string) {
	now := time.Since(r.start).Nanoseconds()
	r.mu.Lock()
	r.times[path] = append(r.times[path], now)
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
	if _, err := io.Copy(io.Discard, req.Body); err != nil {
		return
	}
	r.record(req.URL.Path)
	if strings.HasPrefix(req.URL.Path, "/stall/") {
		select {
		case <-r.stalled():
		case <-req.Context().Done():
			return
		}
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
		r.mu.Unlock()
		writeJSON(w, map[string]any{"total": total, "paths": paths})
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
			Handler: hooks,
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
