// storm_load.go: a connection storm over SSE plain, SSE over TLS, or gRPC (Go, grpc-go).
//
// Opens -n subscribers at -r per second, each on its own connection, spread over
// -b loopback source addresses (127.0.0.1 .. 127.0.0.N: each has its own ephemeral
// ports). A subscriber counts as connected when it has its response head:
//
//	sse      GET /?eventType=T over HTTP/1.1, status line and headers read
//	sse-tls  the same after a TLS handshake (the server's certificate is not checked)
//	grpc     one StreamService/Events stream per connection, its Request sent and the
//	         server's response headers read (cs.Header())
//
// and then holds its connection (reading and discarding) until the end. One JSON
// line at the end: connected, failed by kind (status: a non-200 SSE status or a
// gRPC error), the time until every subscriber was connected or had failed,
// connect-time percentiles (ms, from the start of its dial), the tool's own CPU.
// -f FILE is written once every subscriber is resolved; SIGTERM ends the run.
//
// Build: sh bench/build_grpc_load.sh bench/bin/storm_load storm_load.go
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"io/ioutil"
	"net"
	"os"
	"os/signal"
	"sort"
	"strings"
	"sync"
	"syscall"
	"time"

	"google.golang.org/grpc"
)

type rawCodec struct{}

func (rawCodec) Marshal(v interface{}) ([]byte, error) { return *(v.(*[]byte)), nil }
func (rawCodec) Unmarshal(data []byte, v interface{}) error {
	p := v.(*[]byte)
	*p = append((*p)[:0], data...)
	return nil
}
func (rawCodec) String() string { return "proto" }

func request(t string) []byte {
	et := append([]byte{0x0a, byte(len(t))}, t...)
	return append([]byte{0x0a, byte(len(et))}, et...)
}

type result struct {
	ok   bool
	kind string
	took time.Duration
}

func cpu() float64 {
	var ru syscall.Rusage
	syscall.Getrusage(syscall.RUSAGE_SELF, &ru)
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}

func dialer(i, sources int, timeout time.Duration) *net.Dialer {
	d := &net.Dialer{Timeout: timeout}
	if sources > 1 {
		d.LocalAddr = &net.TCPAddr{IP: net.IPv4(127, 0, 0, byte(1+i%sources))}
	}
	return d
}

// dial connects with an abortive close (RST, no TIME_WAIT): thousands of
// client ports in TIME_WAIT would make the next server's bind fail.
func dial(ctx context.Context, d *net.Dialer, addr string) (net.Conn, error) {
	c, err := d.DialContext(ctx, "tcp", addr)
	if err == nil {
		if tc, ok := c.(*net.TCPConn); ok {
			tc.SetLinger(0)
		}
	}
	return c, err
}

func sse(ctx context.Context, i int, addr, topic string, sources int, useTLS bool, timeout time.Duration) (net.Conn, string) {
	conn, err := dial(ctx, dialer(i, sources, timeout), addr)
	if err != nil {
		if strings.Contains(err.Error(), "refused") {
			return nil, "refused"
		}
		return nil, "timeout"
	}
	conn.SetDeadline(time.Now().Add(timeout))
	if useTLS {
		tc := tls.Client(conn, &tls.Config{InsecureSkipVerify: true, ServerName: "localhost", NextProtos: []string{"http/1.1"}})
		if err := tc.Handshake(); err != nil {
			conn.Close()
			return nil, "early_close"
		}
		conn = tc
	}
	fmt.Fprintf(conn, "GET /?eventType=%s HTTP/1.1\r\nHost: localhost\r\nAccept: text/event-stream\r\n\r\n", topic)
	r := bufio.NewReader(conn)
	status, err := r.ReadString('\n')
	if err != nil {
		conn.Close()
		if ne, ok := err.(net.Error); ok && ne.Timeout() {
			return nil, "timeout"
		}
		return nil, "early_close"
	}
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			conn.Close()
			return nil, "early_close"
		}
		if line == "\r\n" || line == "\n" {
			break
		}
	}
	if !strings.Contains(status, " 200 ") {
		conn.Close()
		if strings.Contains(status, " 503 ") {
			return nil, "503"
		}
		return nil, "status"
	}
	conn.SetDeadline(time.Time{})
	go io.Copy(ioutil.Discard, r)
	return conn, ""
}

func grpcStream(ctx context.Context, i int, addr, topic string, sources int, timeout time.Duration) (*grpc.ClientConn, string) {
	d := dialer(i, sources, timeout)
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	cc, err := grpc.DialContext(dctx, addr, grpc.WithInsecure(), grpc.WithBlock(),
		grpc.WithContextDialer(func(c context.Context, a string) (net.Conn, error) { return dial(c, d, a) }),
		grpc.WithCodec(rawCodec{}))
	if err != nil {
		return nil, "timeout"
	}
	desc := &grpc.StreamDesc{StreamName: "Events", ServerStreams: true, ClientStreams: true}
	cs, err := cc.NewStream(ctx, desc, "/proto.StreamService/Events")
	if err != nil {
		cc.Close()
		return nil, "status"
	}
	req := request(topic)
	if err := cs.SendMsg(&req); err != nil {
		cc.Close()
		return nil, "early_close"
	}
	md, err := cs.Header()
	if err != nil || md == nil {
		cc.Close()
		return nil, "status"
	}
	go func() {
		var buf []byte
		for cs.RecvMsg(&buf) == nil {
		}
	}()
	return cc, ""
}

func main() {
	mode := flag.String("m", "sse", "sse | sse-tls | grpc")
	host := flag.String("H", "127.0.0.1", "host")
	port := flag.Int("p", 0, "port (required)")
	n := flag.Int("n", 1000, "subscribers")
	rate := flag.Float64("r", 1000, "connects per second")
	sources := flag.Int("b", 1, "loopback source addresses")
	topic := flag.String("t", "storm", "event type")
	timeout := flag.Float64("timeout", 30, "per subscriber, dial to response head, s")
	ready := flag.String("f", "", "ready file")
	flag.Parse()
	if *port == 0 {
		fmt.Fprintln(os.Stderr, "-p is required")
		os.Exit(2)
	}
	addr := net.JoinHostPort(*host, fmt.Sprint(*port))
	to := time.Duration(*timeout * float64(time.Second))
	ctx, stop := context.WithCancel(context.Background())
	results := make(chan result, *n)
	var mu sync.Mutex
	var held []io.Closer
	t0, cpu0 := time.Now(), cpu()
	go func() {
		for i := 0; i < *n; i++ {
			due := t0.Add(time.Duration(float64(i) / *rate * float64(time.Second)))
			time.Sleep(time.Until(due))
			go func(i int) {
				start := time.Now()
				var c io.Closer
				var kind string
				if *mode == "grpc" {
					cc, k := grpcStream(ctx, i, addr, *topic, *sources, to)
					if cc != nil {
						c = cc
					}
					kind = k
				} else {
					conn, k := sse(ctx, i, addr, *topic, *sources, *mode == "sse-tls", to)
					if conn != nil {
						c = conn
					}
					kind = k
				}
				if c != nil {
					mu.Lock()
					held = append(held, c)
					mu.Unlock()
				}
				results <- result{ok: kind == "", kind: kind, took: time.Since(start)}
			}(i)
		}
	}()
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	var took []float64
	failed := map[string]int{}
	var allAt time.Duration
	stopped := false
	for resolved := 0; resolved < *n; {
		select {
		case r := <-results:
			resolved++
			if r.ok {
				took = append(took, float64(r.took.Microseconds())/1000)
			} else {
				failed[r.kind]++
			}
		case <-sig:
			resolved, stopped = *n, true
		}
	}
	allAt = time.Since(t0)
	if *ready != "" {
		ioutil.WriteFile(*ready, []byte("{}\n"), 0644)
	}
	sort.Float64s(took)
	pct := func(p float64) float64 {
		if len(took) == 0 {
			return 0
		}
		return took[int(p*float64(len(took)-1))]
	}
	mean := 0.0
	for _, t := range took {
		mean += t
	}
	if len(took) > 0 {
		mean /= float64(len(took))
	}
	out := map[string]interface{}{
		"tool": "storm_load", "mode": *mode, "subscribers": *n, "rate": *rate, "sources": *sources,
		"connected": len(took), "failed": failed, "all_resolved_s": allAt.Seconds(),
		"connect_ms": map[string]float64{"p50": pct(0.5), "p90": pct(0.9), "p99": pct(0.99), "max": pct(1), "mean": mean},
		"tool_cpu_s": cpu() - cpu0,
	}
	if !stopped {
		<-sig
	}
	b, _ := json.Marshal(out)
	fmt.Println(string(b))
	stop()
	mu.Lock()
	for _, c := range held {
		c.Close()
	}
	mu.Unlock()
}
