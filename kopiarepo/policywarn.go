package kopiarepo

import (
	"context"
	"fmt"
	"sort"

	"github.com/kopia/kopia/repo/compression"
	"github.com/kopia/kopia/snapshot/policy"
)

// DeprecatedCompressionWarnings names every policy of the repository, set
// by vmhistory or by kopia's own CLI, that compresses with an algorithm
// kopia keeps only to read old repositories. lz4 among them writes output
// that kopia's own (amd64) decoder refuses for some inputs, so data
// uploaded under such a policy may not come back; "vmhistory bench
// compression --deprecated" shows it on the user's data.
func (r *Repo) DeprecatedCompressionWarnings(ctx context.Context) ([]string, error) {
	return guarded(ctx, r, r.deprecatedCompressionWarnings)
}

func (r *Repo) deprecatedCompressionWarnings(ctx context.Context) ([]string, error) {
	policies, err := policy.ListPolicies(ctx, r.rep)
	if err != nil {
		return nil, fmt.Errorf("list policies of %s: %w", r.storage, err)
	}
	var warnings []string
	for _, p := range policies {
		name := p.CompressionPolicy.CompressorName
		if name == "" || !compression.IsDeprecated[name] {
			continue
		}
		target := p.Target()
		what := "the global policy"
		flag := "--global"
		if target != policy.GlobalPolicySourceInfo {
			what = "the policy of " + target.String()
			flag = target.String()
		}
		warnings = append(warnings, fmt.Sprintf(
			"%s compresses with %s, which kopia deprecates: its output can fail to decompress (see vmhistory bench compression --deprecated); choose another: kopia policy set %s --compression=zstd-better-compression",
			what, name, flag))
	}
	sort.Strings(warnings)
	return warnings, nil
}
