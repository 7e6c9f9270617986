// sse_load.go: SSE fan-out load generator over TLS, HTTP/1.1 or HTTP/2 (Go, standard library).
//
// The TLS counterpart of loadgen.c, with the same JSON reports as grpc_load.go, so that
// bench/fanout.py can drive it (--transport sse-tls / sse-h2). Opens N SSE streams of one
// topic (GET /?eventType=T) over HTTPS: with -h2, HTTP/2 with -c streams per connection;
// otherwise HTTP/1.1, one connection per stream. Counts each `data:` line and reads
// `"ts":<ns>` (publish time, CLOCK_REALTIME) from it for publish->receive latency.
// The server's certificate is not verified (a benchmark on loopback).
//
// SIGUSR1: print {"report":"interval",...} and reset counters. End of -d or SIGTERM/SIGINT:
// print {"report":"final",...} and exit. -f FILE: written once every stream has its
// response head.
//
// Build: sh build_grpc_load.sh bin/sse_load sse_load.go (standard library only).
package main

import (
	"bufio"
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io/ioutil"
	"math"
	"net/http"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

const nb = 5000
const scale = 200.0

type stats struct {
	mu       sync.Mutex
	events   int64
	eventsTs int64
	hist     [nb]int64
	latSum   float64
	latMax   float64
	t0       time.Time
	cpu0     float64
}

func cpuNow() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

func (s *stats) reset() {
	s.events, s.eventsTs, s.latSum, s.latMax = 0, 0, 0, 0
	s.hist = [nb]int64{}
	s.t0 = time.Now()
	s.cpu0 = cpuNow()
}

var tsKey = []byte(`"ts":`)

func (s *stats) add(line []byte, now int64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.events++
	i := bytes.Index(line, tsKey)
	if i < 0 {
		return
	}
	j := i + len(tsKey)
	var ts int64
	k := j
	for k < len(line) && line[k] >= '0' && line[k] <= '9' {
		ts = ts*10 + int64(line[k]-'0')
		k++
	}
	if k == j {
		return
	}
	lat := float64(now-ts) / 1e6
	s.eventsTs++
	s.latSum += lat
	if lat > s.latMax {
		s.latMax = lat
	}
	us := math.Max(lat*1000, 1)
	b := int(math.Log(us) * scale)
	if b >= nb {
		b = nb - 1
	}
	s.hist[b]++
}

func round3(f float64) float64 { return math.Round(f*1000) / 1000 }

func (s *stats) report(kind string, streams int, open, ended int64, proto string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	wall := time.Since(s.t0).Seconds()
	cpu := cpuNow() - s.cpu0
	rec := map[string]interface{}{"report": kind, "streams": streams, "open": open, "ended": ended,
		"events": s.events, "events_ts": s.eventsTs, "wall_s": round3(wall),
		"loadgen_cpu_s": round3(cpu), "proto": proto, "pid": os.Getpid()}
	if wall > 0 {
		rec["events_per_s"] = math.Round(float64(s.events)/wall*10) / 10
		rec["loadgen_cpu_frac"] = round3(cpu / wall)
	}
	rec["lat_ms"] = nil
	if s.eventsTs > 0 {
		pct := func(p float64) float64 {
			target, acc := p*float64(s.eventsTs), int64(0)
			for k := 0; k < nb; k++ {
				acc += s.hist[k]
				if float64(acc) >= target {
					return math.Exp((float64(k)+0.5)/scale) / 1000
				}
			}
			return s.latMax
		}
		rec["lat_ms"] = map[string]float64{"p50": round3(pct(0.5)), "p90": round3(pct(0.9)),
			"p99": round3(pct(0.99)), "max": round3(s.latMax), "mean": round3(s.latSum / float64(s.eventsTs))}
	}
	b, _ := json.Marshal(rec)
	fmt.Println(string(b))
}

func main() {
	host := flag.String("H", "127.0.0.1", "host")
	port := flag.Int("p", 0, "port (required)")
	n := flag.Int("n", 200, "streams")
	h2 := flag.Bool("h2", false, "HTTP/2 (otherwise HTTP/1.1, one connection per stream)")
	perConn := flag.Int("c", 50, "HTTP/2: streams per connection")
	typ := flag.String("t", "bench", "event type to subscribe")
	dur := flag.Float64("d", 10, "seconds to run after all streams are open")
	ramp := flag.Float64("r", 2000, "stream opens per second (0 = all at once)")
	ready := flag.String("f", "", "ready file")
	flag.Parse()
	if *port == 0 {
		fmt.Fprintln(os.Stderr, "-p PORT required")
		os.Exit(2)
	}
	tlsConfig := &tls.Config{InsecureSkipVerify: true}
	clients := []*http.Client{}
	if *h2 {
		for i := 0; i < (*n+*perConn-1)/(*perConn); i++ {
			clients = append(clients, &http.Client{Transport: &http.Transport{
				TLSClientConfig: tlsConfig, ForceAttemptHTTP2: true, MaxConnsPerHost: 1}})
		}
	} else {
		clients = append(clients, &http.Client{Transport: &http.Transport{
			TLSClientConfig: tlsConfig, MaxIdleConnsPerHost: *n,
			TLSNextProto: map[string]func(string, *tls.Conn) http.RoundTripper{}}})
	}
	url := fmt.Sprintf("https://%s:%d/?eventType=%s", *host, *port, *typ)
	st := &stats{}
	st.reset()
	ctx, cancel := context.WithCancel(context.Background())
	var mu sync.Mutex
	var open, ended, answered int64
	proto := ""
	t0 := time.Now()
	for i := 0; i < *n; i++ {
		go func(i int) {
			req, _ := http.NewRequestWithContext(ctx, "GET", url, nil)
			req.Header.Set("Accept", "text/event-stream")
			resp, err := clients[i%len(clients)].Do(req)
			mu.Lock()
			if err == nil && resp.StatusCode == 200 {
				open++
				answered++
				proto = resp.Proto
			} else {
				ended++
				if err != nil {
					fmt.Fprintln(os.Stderr, "stream:", err)
				}
			}
			mu.Unlock()
			if err != nil || resp.StatusCode != 200 {
				return
			}
			reader := bufio.NewReaderSize(resp.Body, 64*1024)
			for {
				line, err := reader.ReadSlice('\n')
				if err != nil && err != bufio.ErrBufferFull {
					break
				}
				if bytes.HasPrefix(line, []byte("data:")) {
					st.add(line, time.Now().UnixNano())
				}
			}
			resp.Body.Close()
			mu.Lock()
			open--
			ended++
			mu.Unlock()
		}(i)
		if *ramp > 0 && (i+1)%50 == 0 {
			time.Sleep(time.Duration(50 / *ramp * float64(time.Second)))
		}
	}
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		mu.Lock()
		done := answered+ended >= int64(*n)
		mu.Unlock()
		if done {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if *ready != "" {
		mu.Lock()
		b, _ := json.Marshal(map[string]interface{}{"established": answered, "open": open,
			"ended": ended, "connect_s": round3(time.Since(t0).Seconds()), "proto": proto})
		mu.Unlock()
		ioutil.WriteFile(*ready+".tmp", b, 0644)
		os.Rename(*ready+".tmp", *ready)
	}
	st.reset()
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGUSR1, syscall.SIGTERM, syscall.SIGINT)
	timer := time.NewTimer(time.Duration(*dur * float64(time.Second)))
	for loop := true; loop; {
		select {
		case s := <-sigs:
			if s == syscall.SIGUSR1 {
				mu.Lock()
				o, e := open, ended
				mu.Unlock()
				st.report("interval", *n, o, e, proto)
				st.reset()
			} else {
				loop = false
			}
		case <-timer.C:
			loop = false
		}
	}
	mu.Lock()
	o, e := open, ended
	mu.Unlock()
	st.report("final", *n, o, e, proto)
	cancel()
}
