// Command helm-render renders a helm chart the way `helm template` does, offline, with the
// libraries Debian packages: text/template with sprig (helm's function library) and helm's own
// additions (include, tpl, toYaml, required, ...), values deep-merged from values.yaml, -f files
// and --set, checked against values.schema.json with gojsonschema (what helm validates with).
//
// It is not helm: no subcharts, no hooks, no lookup against a cluster (lookup returns an empty
// map, as `helm template` does), and --set knows only a.b.c=v and a={x,y}. It exists so the chart
// can be rendered and checked where no helm binary can be had (see helm/gateway/README.md).
//
// Build offline against Debian's GOPATH sources:
//
//	GO111MODULE=off GOPATH=/usr/share/gocode go build -o helm-render ./ops/helm-render
//
// Usage:
//
//	helm-render [--name RELEASE] [--namespace NS] [-f values.yaml]... [--set a.b=c]...
//	            [--set-string a.b=c]... [--output FILE] [--notes FILE] CHART_DIR
//
// Exit codes: 0 rendered; 1 the chart, its values or a template failed (the error on stderr);
// 2 wrong usage.
package main

import (
	"flag"
	"fmt"
	"os"
	"strings"
)

type multiFlag []string

func (m *multiFlag) String() string     { return strings.Join(*m, ",") }
func (m *multiFlag) Set(v string) error { *m = append(*m, v); return nil }

func main() {
	var valueFiles, sets, setStrings, apiVersions multiFlag
	fs := flag.NewFlagSet("helm-render", flag.ContinueOnError)
	name := fs.String("name", "release-name", "release name (.Release.Name)")
	namespace := fs.String("namespace", "default", "release namespace (.Release.Namespace)")
	kubeVersion := fs.String("kube-version", "v1.31.0", "Kubernetes version for .Capabilities.KubeVersion")
	output := fs.String("output", "", "write the manifests here instead of stdout")
	notes := fs.String("notes", "", "also render templates/NOTES.txt into this file")
	fs.Var(&valueFiles, "f", "values file, repeatable; later files win")
	fs.Var(&valueFiles, "values", "same as -f")
	fs.Var(&sets, "set", "a.b.c=value, repeatable; values typed as helm does (int, bool, null, {list})")
	fs.Var(&setStrings, "set-string", "a.b.c=value, always a string")
	fs.Var(&apiVersions, "api-versions", "extra API versions for .Capabilities.APIVersions.Has")
	if err := fs.Parse(reorderArgs(os.Args[1:])); err != nil {
		os.Exit(2)
	}
	if fs.NArg() != 1 {
		fmt.Fprintln(os.Stderr, "usage: helm-render [flags] CHART_DIR")
		fs.PrintDefaults()
		os.Exit(2)
	}

	chart, err := loadChart(fs.Arg(0))
	if err != nil {
		fail(err)
	}
	values, err := mergeValues(chart.Values, valueFiles, sets, setStrings)
	if err != nil {
		fail(err)
	}
	if err := validateSchema(chart, values); err != nil {
		fail(err)
	}
	release := releaseInfo{Name: *name, Namespace: *namespace, Service: "Helm", IsInstall: true, Revision: 1}
	caps, err := newCapabilities(*kubeVersion, apiVersions)
	if err != nil {
		fail(err)
	}
	rendered, err := render(chart, values, release, caps)
	if err != nil {
		fail(err)
	}
	stream, err := manifestStream(rendered)
	if err != nil {
		fail(err)
	}
	if err := writeOut(*output, stream); err != nil {
		fail(err)
	}
	if *notes != "" {
		if err := os.WriteFile(*notes, []byte(rendered.Notes), 0o644); err != nil {
			fail(err)
		}
	}
}

// reorderArgs lets the chart directory come first, as with helm (`helm template DIR -f x`):
// the flag package stops at the first positional argument.
func reorderArgs(args []string) []string {
	var flags, positional []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		switch {
		case a == "--":
			positional = append(positional, args[i+1:]...)
			i = len(args)
		case strings.HasPrefix(a, "-") && len(a) > 1:
			flags = append(flags, a)
			if !strings.Contains(a, "=") && i+1 < len(args) {
				flags = append(flags, args[i+1])
				i++
			}
		default:
			positional = append(positional, a)
		}
	}
	return append(flags, positional...)
}

func writeOut(path, text string) error {
	if path == "" {
		_, err := os.Stdout.WriteString(text)
		return err
	}
	return os.WriteFile(path, []byte(text), 0o644)
}

func fail(err error) {
	fmt.Fprintf(os.Stderr, "Error: %v\n", err)
	os.Exit(1)
}
