package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"strings"
	"time"

	"github.com/dustin/go-humanize"
	"github.com/spf13/cobra"

	"github.com/vmhistory/vmhistory/kopiarepo/drivemodel"
	"github.com/vmhistory/vmhistory/safefile"
)

func init() {
	benchSubcommands = append(benchSubcommands, newBenchDriveProxyCommand)
}

func newBenchDriveProxyCommand(opts *globalOptions) *cobra.Command {
	var (
		upstream   string
		listen     string
		preset     string
		latency    time.Duration
		streamRate string
		totalRate  string
		errorRate  float64
		seed       uint64
		logFile    string
	)
	cmd := &cobra.Command{
		Use:   "drive-proxy --upstream URL",
		Short: "Serve a WebDAV server through a model of a distant drive, for any client (the kopia CLI too)",
		Long: `Listen on a loopback address and pass every HTTP request on to the WebDAV
server at --upstream through a model of a distant drive (Google Drive and the
like), so that any program, the kopia CLI as much as vmhistory, can be
measured against the same slow store on the same repository:

  latency     waited once per request, before it is passed on;
  bandwidth   every response body, and every PUT's body, streams through
              paced: each at most --stream-rate, all of them together at most
              --total-rate in each direction; ranged GETs (kopia reads part of
              a pack) the same, by the bytes the server sends;
  errors      --error-rate of the GET, PUT, DELETE, MOVE, COPY and
              PROPFIND "Depth: 0" requests (the ones kopia retries) answered
              "429 Too Many Requests" or "503 Service Unavailable" after their
              latency, without reaching the server. Listings are never failed:
              kopia does not retry them.

Presets (--preset; the other flags override one property):
  none    no latency, no limit, no errors: only the counters;
  drive   150 ms per request, 20 MiB/s per stream, 400 MiB/s total, 1% errors;
  seed    1.2 s per request, 6 MiB/s per stream, 400 MiB/s total (the seed
          host's Google Drive, where kopia mount + cp of a 51 GiB disk took
          377 minutes).

The first line on stdout is the proxy's URL, http://127.0.0.1:PORT/ (with
--listen 127.0.0.1:0 the port is a free one): a client uses it where it would
use the server's, with the same path and credentials, e.g. a kopia WebDAV
repository at http://127.0.0.1:PORT/kopia/ for the server's /kopia/. The proxy
runs until SIGTERM or SIGINT, then prints what reached it (--json: as JSON):
requests, GETs and the bytes they returned, PUTs and the bytes they sent,
injected errors, the most GETs in flight at once. --log FILE appends one line
per request (start, method, path, Range, status, body bytes, seconds) to see
what a client asks for, e.g. how many bytes it fetches more than once.

It listens on loopback only: it passes every request and its credentials on
unchecked. scripts/restore-vs-kopia.sh --preset drive runs it between the
kopia CLI (and vmhistory) and "rclone serve webdav".`,
		Example: `  rclone serve webdav /srv/dav --addr 127.0.0.1:8080 --user u --pass p &
  vmhistory bench drive-proxy --upstream http://127.0.0.1:8080/ --preset drive > proxy.out &
  url=$(head -1 proxy.out)   # http://127.0.0.1:PORT/
  kopia repository connect webdav --url "${url}kopia/" --webdav-username u --webdav-password p
  vmhistory bench drive-proxy --upstream http://127.0.0.1:8080/ --listen 127.0.0.1:18080 --preset seed --error-rate 0.05`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := drivemodel.Preset(preset)
			if err != nil {
				return err
			}
			flags := cmd.Flags()
			if flags.Changed("latency") {
				if latency < 0 {
					return fmt.Errorf("--latency %v is negative", latency)
				}
				p.Latency = latency
			}
			if flags.Changed("stream-rate") {
				if p.StreamBytesPerSecond, err = parseRate("--stream-rate", streamRate); err != nil {
					return err
				}
			}
			if flags.Changed("total-rate") {
				if p.TotalBytesPerSecond, err = parseRate("--total-rate", totalRate); err != nil {
					return err
				}
			}
			if flags.Changed("error-rate") {
				if errorRate < 0 || errorRate > 1 {
					return fmt.Errorf("--error-rate %v is not a fraction between 0 and 1 (write e.g. 0.01 for 1%%)", errorRate)
				}
				p.ErrorRate = errorRate
			}
			p.Seed = seed
			up, err := url.Parse(upstream)
			if err != nil {
				return fmt.Errorf("--upstream %q: %v", upstream, err)
			}
			var proxyOpts []drivemodel.ProxyOption
			if logFile != "" {
				f, err := safefile.OpenFile(logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
				if err != nil {
					return fmt.Errorf("--log: %w", err)
				}
				defer f.Close()
				proxyOpts = append(proxyOpts, drivemodel.WithRequestLog(f))
			}
			model := drivemodel.NewModel(p)
			srv, err := drivemodel.StartProxy(listen, up, model, proxyOpts...)
			if err != nil {
				return err
			}
			ctx, stop := interruptContext(cmd.Context())
			defer stop()
			fmt.Fprintln(cmd.OutOrStdout(), srv.URL)
			fmt.Fprintf(cmd.ErrOrStderr(), "drive-proxy: %s → %s through the drive model (%v); SIGTERM or SIGINT to stop\n", srv.URL, up, p)
			<-ctx.Done()
			closeCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			closeErr := srv.Close(closeCtx)
			if err := printProxyStats(cmd, opts, p, model.Stats()); err != nil {
				return err
			}
			return closeErr
		},
	}
	f := cmd.Flags()
	f.StringVar(&upstream, "upstream", "", "URL of the WebDAV server to pass requests on to, e.g. http://127.0.0.1:8080/ (required)")
	f.StringVar(&listen, "listen", "127.0.0.1:0", "loopback address to listen on; port 0 picks a free one")
	f.StringVar(&preset, "preset", "drive", "drive model: "+strings.Join(drivemodel.PresetNames(), ", "))
	f.DurationVar(&latency, "latency", 0, "latency per request, instead of the preset's (e.g. 300ms)")
	f.StringVar(&streamRate, "stream-rate", "", "bandwidth of one body, per second, instead of the preset's (e.g. 20MiB; 0 = unlimited)")
	f.StringVar(&totalRate, "total-rate", "", "bandwidth of all bodies together in each direction, per second, instead of the preset's (e.g. 400MiB; 0 = unlimited)")
	f.Float64Var(&errorRate, "error-rate", 0, "fraction of fallible requests answered 429/503, instead of the preset's (e.g. 0.01)")
	f.Uint64Var(&seed, "seed", 0, "seed of the error injection, for a reproducible run (0 = random)")
	f.StringVar(&logFile, "log", "", "append one line per request to this file: start, method, path, Range, status, bytes sent, seconds")
	_ = cmd.MarkFlagRequired("upstream")
	return cmd
}

// parseRate reads a bandwidth flag: a size per second, "20MiB" or "20MiB/s".
func parseRate(flag, s string) (float64, error) {
	n, err := humanize.ParseBytes(strings.TrimSuffix(strings.TrimSpace(s), "/s"))
	if err != nil {
		return 0, fmt.Errorf("%s %q: %v (write a size per second, e.g. 20MiB)", flag, s, err)
	}
	return float64(n), nil
}

func printProxyStats(cmd *cobra.Command, opts *globalOptions, p drivemodel.Params, s drivemodel.Stats) error {
	w := cmd.OutOrStdout()
	if opts.jsonOutput {
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(struct {
			Model string `json:"model"`
			drivemodel.Stats
		}{p.String(), s})
	}
	_, err := fmt.Fprintf(w, `model            %v
requests         %d
gets             %d (at most %d at once)
bytes fetched    %s (%d)
puts             %d
bytes stored     %s (%d)
injected errors  %d
`, p, s.Requests, s.Gets, s.MaxConcurrentGets, humanize.IBytes(uint64(s.BytesFetched)), s.BytesFetched,
		s.Puts, humanize.IBytes(uint64(s.BytesStored)), s.BytesStored, s.InjectedErrors)
	return err
}
